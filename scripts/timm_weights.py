"""Write timm-format ResNet / ViT weights made by timm itself (timm.create_model(name, pretrained=False): timm's own
random init, nothing downloaded), to try `model.pretrained=timm:PATH` and to serve as the parity reference.

    python scripts/timm_weights.py resnet18 /tmp/resnet18.pth                  # a torch state dict
    python scripts/timm_weights.py vit_tiny_patch16_224 /tmp/vit_tiny --hf     # timm's HF-hub layout:
                                                                               #   config.json + model.safetensors
    lamina finetune model.pretrained=timm:/tmp/resnet18.pth finetune.input_size=32 trainer.max_epochs=1

Needs timm: `pip install --no-deps timm==1.0.31` (--no-deps: timm declares torchvision, and PyPI's torchvision
for this torch is a CUDA build that does not import on CPU torch). Every timm release imports torchvision at module
level (timm/layers/create_norm.py and norm_act.py: `from torchvision.ops.misc import FrozenBatchNorm2d`; timm.data:
torchvision.transforms), although its ResNet and ViT code never calls it. `import_timm()` therefore imports timm
with a stand-in `torchvision` whose every class raises when used, and removes the stand-in afterwards: a timm
code path that needed torchvision would fail loudly, not compute something else.
"""

from __future__ import annotations

import argparse
import importlib.abc
import importlib.machinery
import sys
import types


class _Absent(type):
    """A torchvision name timm refers to at import time; calling or instantiating it raises."""

    def __getattr__(cls, name):
        if name.startswith("__"):
            raise AttributeError(name)
        return _Absent(name, (), {})

    def __call__(cls, *args, **kwargs):
        raise RuntimeError(f"torchvision stand-in: {cls.__name__} is not available (timm imported without it)")


class _AbsentModule(types.ModuleType):
    def __getattr__(self, name):
        if name.startswith("__"):
            raise AttributeError(name)
        return _Absent(name, (), {})


class _StandIn(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    def find_spec(self, fullname, path, target=None):
        if fullname == "torchvision" or fullname.startswith("torchvision."):
            return importlib.machinery.ModuleSpec(fullname, self, is_package=True)
        return None

    def create_module(self, spec):
        module = _AbsentModule(spec.name)
        module.__path__ = []
        return module

    def exec_module(self, module):
        pass


def import_timm():
    """The timm module, imported with the torchvision stand-in (removed again, so nothing else sees it)."""
    if "timm" not in sys.modules:
        finder = _StandIn()
        sys.meta_path.insert(0, finder)
        try:
            import timm
        finally:
            sys.meta_path.remove(finder)
            for name in [n for n in sys.modules if n == "torchvision" or n.startswith("torchvision.")]:
                if isinstance(sys.modules[name], _AbsentModule):
                    del sys.modules[name]
    import timm

    return timm


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("name", help="a timm model name, e.g. resnet18, resnet50, vit_tiny_patch16_224")
    p.add_argument("out", help="a .pth file, or a folder with --hf")
    p.add_argument("--hf", action="store_true", help="timm's save_for_hf layout: config.json + model.safetensors")
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    import torch

    timm = import_timm()
    torch.manual_seed(a.seed)
    model = timm.create_model(a.name, pretrained=False)
    if a.hf:
        from timm.models import save_for_hf

        save_for_hf(model, a.out, safe_serialization=True)
    else:
        torch.save(model.state_dict(), a.out)
    n = sum(t.numel() for t in model.parameters())
    print(f"{a.name}: {n:,} parameters (timm {timm.__version__}, random init) -> {a.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
