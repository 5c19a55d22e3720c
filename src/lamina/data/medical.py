"""Medical images: PneumoniaMNIST (pediatric chest X-rays, normal vs pneumonia), shipped in datasets/pneumoniamnist;
DICOM and NIfTI readers with the metadata that decides how pixels are read; folders of volumes as a data set.

* DICOM (pydicom): the header is read first (pixel data deferred); a file without pixel data (RT plans, structured reports) or whose
  declared Rows x Columns x frames exceeds MAX_VOXELS is refused before any pixel is decoded. Pixels become
  modality units (CT: Hounsfield) by RescaleSlope / RescaleIntercept; MONOCHROME1 is inverted so bright is dense;
  `window(x, center, width)` maps a window (the file's WindowCenter / WindowWidth, or a named preset) to [0, 1].
  A folder of slices is a series: sorted along the slice normal by ImagePositionPatient, spacing from the
  positions (not SliceThickness, which is the reconstruction's thickness, not the step).
* NIfTI (nibabel): the header's shape is checked before the data is read; volumes are reoriented to the closest
  canonical (RAS+) orientation so axis 0 always runs left -> right whatever the scanner wrote; the original axis
  codes and the voxel spacing (zooms) travel in the metadata.
* medical_volumes: a folder with one subfolder per class holding .nii / .nii.gz files or DICOM series folders;
  each volume resampled to size^3 (trilinear), z-scored (or windowed), split stratified by class.

The .npz is read with allow_pickle=False (a file of arrays, never objects) and every array's shape and dtype is
checked before use. Splits are the file's own: train 3,882 (388 normal / 3,494 pneumonia), val 524 and test 624,
the last two as in MedMNIST v2 (see datasets/pneumoniamnist/README.md for how the training split differs).
"""

from __future__ import annotations

from pathlib import Path

import torch.nn.functional as F

import numpy as np
import torch

from lamina.data.base import DataBundle, TensorData
from lamina.data.builtin import datasets_root
from lamina.data.files import PathLike, registered
from lamina.errors import DataError

PNEUMONIA_CLASSES = ["normal", "pneumonia"]


def read_medmnist(path: Path, classes: int) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """{split: (images uint8 (N, H, W), labels int64 (N,))} of a MedMNIST-layout .npz, every array checked."""
    if not path.is_file():
        raise DataError(f"{path}: MedMNIST file not found; it ships in the source checkout under datasets/ (or set "
                        "LAMINA_DATASETS, or pass path=)")
    try:
        z = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as e:
        raise DataError(f"{path}: not a readable .npz of arrays ({str(e).splitlines()[0]})") from None
    out = {}
    try:
        with z:
            for split in ("train", "val", "test"):
                xi, yi = f"{split}_images", f"{split}_labels"
                if xi not in z.files or yi not in z.files:
                    raise DataError(f"{path}: missing {xi} / {yi}; expected MedMNIST's train/val/test _images and "
                                    "_labels")
                x, y = z[xi], z[yi].reshape(-1)  # object arrays raise here: allow_pickle=False
                if x.dtype != np.uint8 or x.ndim != 3 or len(x) != len(y) or len(x) == 0:
                    raise DataError(f"{path}: {xi} must be uint8 (N, H, W) with one label each, got {x.dtype} "
                                    f"{x.shape} and {len(y)} labels")
                if not np.issubdtype(y.dtype, np.integer) or y.min() < 0 or y.max() >= classes:
                    raise DataError(f"{path}: {yi} must hold integer labels in 0..{classes - 1}")
                out[split] = (x, y.astype(np.int64))
    except (ValueError, OSError) as e:  # pickled objects, truncated members
        raise DataError(f"{path}: unreadable arrays ({str(e).splitlines()[0]}); expected plain uint8 images and "
                        "integer labels") from None
    return out


@registered("pneumoniamnist", "PneumoniaMNIST chest X-rays (MedMNIST v2), 28x28 gray, normal vs pneumonia; "
            "3,882 / 524 / 624", "classification", "datasets/pneumoniamnist (CC BY 4.0)")
def pneumoniamnist(*, path: PathLike | None = None, seed: int = 0) -> DataBundle:
    p = Path(path).expanduser() if path is not None else datasets_root() / "pneumoniamnist" / "pneumoniamnist.npz"
    parts = read_medmnist(p, len(PNEUMONIA_CLASSES))
    data = {s: TensorData(x=torch.from_numpy(x).float().div_(255.0).unsqueeze(1), y=torch.from_numpy(y))
            for s, (x, y) in parts.items()}
    meta = {"loader": "pneumoniamnist", "pixel_max": 255.0, "classes": PNEUMONIA_CLASSES,
            "class_counts": {s: np.bincount(y, minlength=2).tolist() for s, (_, y) in parts.items()}}
    return DataBundle("pneumoniamnist", data["train"], data["val"], data["test"], "classification",
                      (1, *parts["train"][0].shape[1:]), len(PNEUMONIA_CLASSES), PNEUMONIA_CLASSES, meta)


# ----- DICOM / NIfTI -----------------------------------------------------------------------------------------------
MAX_VOXELS = 512 * 512 * 512  # one study: a 512^3 CT (0.5 GB as float32); larger headers are refused unread
WINDOWS = {"lung": (-600.0, 1500.0), "mediastinum": (50.0, 350.0), "bone": (400.0, 1800.0),
           "brain": (40.0, 80.0), "abdomen": (40.0, 400.0)}  # (center, width) in HU, the usual CT presets


def _need(module: str):
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError:
        raise DataError(f"{module} is not installed; medical image files need it: pip install \"lamina[medical]\"") from None


def window(x: np.ndarray, center: float, width: float) -> np.ndarray:
    """Modality units -> [0, 1]: center - width/2 maps to 0, center + width/2 to 1, clipped (DICOM's linear VOI)."""
    if width <= 0:
        raise DataError(f"window: width must be positive, got {width}")
    return np.clip((x - (center - width / 2.0)) / width, 0.0, 1.0).astype(np.float32)


def _first(v):
    """A DICOM value that may be multi-valued (WindowCenter '40\\400'): its first entry as float, or None."""
    if v is None:
        return None
    try:
        return float(v[0]) if hasattr(v, "__len__") and not isinstance(v, str) else float(v)
    except (TypeError, ValueError, IndexError):
        return None


def read_dicom(path: PathLike) -> tuple[np.ndarray, dict]:
    """(pixels float32 (H, W) or (frames, H, W) in modality units, metadata) of one DICOM file."""
    pydicom = _need("pydicom")
    from pydicom.errors import InvalidDicomError

    p = Path(path).expanduser()
    if not p.is_file():
        raise DataError(f"{p}: DICOM file not found")
    try:
        head = pydicom.dcmread(p, defer_size="64 KB")  # large values (pixels) stay on disk until asked for
    except (InvalidDicomError, OSError, ValueError, EOFError) as e:
        raise DataError(f"{p}: not a readable DICOM file ({str(e).splitlines()[0][:120]})") from None
    if "PixelData" not in head and "FloatPixelData" not in head and "DoubleFloatPixelData" not in head:
        raise DataError(f"{p}: DICOM without pixel data (Modality {head.get('Modality', '?')}, "
                        f"{getattr(head.get('SOPClassUID'), 'name', 'unknown SOP class')}); nothing to read as an image")
    rows, cols, frames = int(head.get("Rows", 0)), int(head.get("Columns", 0)), int(head.get("NumberOfFrames", 1) or 1)
    if rows <= 0 or cols <= 0 or rows * cols * frames > MAX_VOXELS:
        raise DataError(f"{p}: declared image {frames} x {rows} x {cols} is empty or larger than {MAX_VOXELS:,} "
                        "pixels; refused before decoding")
    try:
        ds = head
        arr = ds.pixel_array.astype(np.float32)
    except Exception as e:  # noqa: BLE001 - compressed syntaxes without a decoder, truncated pixel data, ...
        raise DataError(f"{p}: pixel data cannot be decoded ({type(e).__name__}: {str(e).splitlines()[0][:160]})") from None
    slope, intercept = _first(ds.get("RescaleSlope")) or 1.0, _first(ds.get("RescaleIntercept")) or 0.0
    arr = arr * slope + intercept
    photometric = str(ds.get("PhotometricInterpretation", ""))
    if photometric == "MONOCHROME1":  # 0 is white: invert so larger means denser, as MONOCHROME2
        arr = arr.max() + arr.min() - arr
    spacing = [float(v) for v in ds.get("PixelSpacing", [])] or None
    meta = {"modality": str(ds.get("Modality", "")), "rows": rows, "columns": cols, "frames": frames,
            "pixel_spacing": spacing, "slice_thickness": _first(ds.get("SliceThickness")),
            "window_center": _first(ds.get("WindowCenter")), "window_width": _first(ds.get("WindowWidth")),
            "photometric": photometric, "rescale": [slope, intercept],
            "position": [float(v) for v in ds.get("ImagePositionPatient", [])] or None,
            "orientation": [float(v) for v in ds.get("ImageOrientationPatient", [])] or None,
            "instance": int(ds.get("InstanceNumber", 0) or 0)}
    return arr, meta


def read_dicom_series(folder: PathLike) -> tuple[np.ndarray, dict]:
    """A folder of single-frame DICOM slices -> (volume float32 (D, H, W), metadata with spacing (z, y, x))."""
    d = Path(folder).expanduser()
    files = sorted(f for f in d.iterdir() if f.is_file()) if d.is_dir() else []
    if not files:
        raise DataError(f"{d}: no DICOM slices in this folder")
    slices = [read_dicom(f) for f in files]
    shapes = {a.shape for a, _ in slices}
    if len(shapes) != 1 or len(next(iter(shapes))) != 2:
        raise DataError(f"{d}: slices of different sizes or multi-frame files {sorted(shapes)}; a series is "
                        "single-frame slices of one size")
    metas = [m for _, m in slices]
    if all(m["position"] and m["orientation"] for m in metas):  # order along the slice normal
        o = np.array(metas[0]["orientation"])
        normal = np.cross(o[:3], o[3:])
        keys = [float(np.dot(normal, m["position"])) for m in metas]
    else:
        keys = [float(m["instance"]) for m in metas]
    order = np.argsort(keys, kind="stable")
    vol = np.stack([slices[i][0] for i in order])
    steps = np.diff(np.sort(keys))
    dz = float(np.median(steps)) if len(steps) and np.all(np.isfinite(steps)) and steps.size else \
        (metas[0]["slice_thickness"] or 1.0)
    if vol.size > MAX_VOXELS:
        raise DataError(f"{d}: series of {vol.size:,} voxels is larger than {MAX_VOXELS:,}")
    row = metas[0]["pixel_spacing"] or [1.0, 1.0]
    return vol, {**metas[0], "slices": len(files), "spacing": [dz, row[0], row[1]]}


def read_nifti(path: PathLike) -> tuple[np.ndarray, dict]:
    """(volume float32 (X, Y, Z) in canonical RAS+ orientation, metadata: spacing, original axis codes, affine)."""
    nib = _need("nibabel")
    p = Path(path).expanduser()
    if not p.is_file():
        raise DataError(f"{p}: NIfTI file not found")
    try:
        img = nib.load(str(p))
    except Exception as e:  # noqa: BLE001 - nibabel raises several types for bad headers
        raise DataError(f"{p}: not a readable NIfTI file ({str(e).splitlines()[0][:160]})") from None
    shape = tuple(int(s) for s in img.shape)
    if len(shape) != 3:
        raise DataError(f"{p}: a {len(shape)}-D image {shape}; medical_volumes reads 3-D volumes (take one "
                        "volume of a 4-D series first)")
    if int(np.prod(shape)) > MAX_VOXELS or min(shape) < 1:
        raise DataError(f"{p}: declared volume {shape} is empty or larger than {MAX_VOXELS:,} voxels; refused unread")
    codes = "".join(nib.aff2axcodes(img.affine))
    canon = nib.as_closest_canonical(img)
    vol = np.asarray(canon.get_fdata(dtype=np.float32))
    return vol, {"spacing": [float(z) for z in canon.header.get_zooms()[:3]], "axcodes": codes,
                 "canonical": "".join(nib.aff2axcodes(canon.affine)), "affine": canon.affine.tolist()}


def read_volume(path: Path) -> tuple[np.ndarray, dict]:
    if path.is_dir():
        return read_dicom_series(path)
    if path.name.endswith((".nii", ".nii.gz")):
        return read_nifti(path)
    raise DataError(f"{path}: not a volume; expected .nii / .nii.gz files or folders of DICOM slices")


@registered("medical_volumes", "3-D volumes from a folder per class (.nii / .nii.gz files or DICOM series folders), "
            "resampled to size^3", "classification", "your folder (pip install lamina[medical])")
def medical_volumes(*, path: PathLike, size: int = 32, window_preset: str | None = None, val_fraction: float = 0.15,
                    test_fraction: float = 0.15, seed: int = 0) -> DataBundle:
    from lamina.data.splits import split_indices

    root = Path(path).expanduser()
    classes = sorted(d.name for d in root.iterdir() if d.is_dir()) if root.is_dir() else []
    if len(classes) < 2:
        raise DataError(f"{root}: expected a folder with one subfolder per class (at least 2), found {classes}")
    if not 4 <= int(size) <= 128:
        raise DataError(f"medical_volumes: size must be in 4 .. 128 voxels per side, got {size}")
    if window_preset is not None and window_preset not in WINDOWS:
        raise DataError(f"medical_volumes: window_preset {window_preset!r} unknown; valid: {', '.join(WINDOWS)}")
    xs, ys, names = [], [], []
    for c, cls in enumerate(classes):
        items = sorted((root / cls).iterdir())
        if not items:
            raise DataError(f"{root / cls}: class folder is empty")
        for item in items:
            vol, _ = read_volume(item)
            if window_preset:
                vol = window(vol, *WINDOWS[window_preset])
            else:  # z-score per volume: scanners differ in scale
                vol = (vol - vol.mean()) / max(float(vol.std()), 1e-6)
            t = torch.from_numpy(np.ascontiguousarray(vol, np.float32))[None, None]  # (1, 1, D, H, W)
            xs.append(F.interpolate(t, size=(int(size),) * 3, mode="trilinear", align_corners=False)[0])
            ys.append(c)
            names.append(str(item.relative_to(root)))
    x, y = torch.stack(xs), torch.tensor(ys)
    tr, va, te = split_indices(len(y), val_fraction, test_fraction, seed, stratify=y)
    parts = [TensorData(x=x[i], y=y[i]) for i in (tr, va, te)]
    meta = {"loader": "medical_volumes", "classes": classes, "size": int(size), "window": window_preset,
            "files": names}
    return DataBundle("medical_volumes", parts[0], parts[1] if len(va) else None, parts[2] if len(te) else None,
                      "classification", (1, int(size), int(size), int(size)), len(classes), classes, meta)


__all__ = ["MAX_VOXELS", "PNEUMONIA_CLASSES", "WINDOWS", "medical_volumes", "pneumoniamnist",
           "read_dicom", "read_dicom_series", "read_medmnist", "read_nifti", "read_volume", "window"]
