"""Model families, one per file; importing this package fills the registry."""

from lamina.models import cnn, gpt, lenet, mlp, resnet  # noqa: F401  (registers the families)
from lamina.models import rnn  # noqa: F401  (recurrent family)
from lamina.models import llama  # noqa: F401  (Llama decoder-only LMs)
from lamina.models import vit  # noqa: F401  (Vision Transformers)
from lamina.models import efficientnet  # noqa: F401  (EfficientNet B0 / Lite0)
from lamina.models import bert  # noqa: F401  (BERT encoders: masked LM, sequence classifiers)
from lamina.models import multimodal  # noqa: F401  (CLIP-style dual encoder, fusion classifier)
from lamina.models import t5  # noqa: F401  (T5 encoder-decoder)
from lamina.models import ctc  # noqa: F401  (CTC acoustic models for speech recognition)
from lamina.models import cnn3d  # noqa: F401  (3-D CNN for medical volumes)
from lamina.models import centernet  # noqa: F401  (anchor-free detector)
from lamina.models import face  # noqa: F401  (face embedders for ArcFace / CosFace / triplets)
from lamina.models import hybrid  # noqa: F401  (hybrid quantum-classical classifiers; pennylane lazily)
from lamina.models import recsys  # noqa: F401  (recommenders: mf, two_tower, ncf over user / item ids)
from lamina.models.contract import check_input_shape, example_input
from lamina.models.generation import generate
from lamina.models.registry import create_model, get_entry, list_models, register_model

__all__ = ["create_model", "list_models", "register_model", "get_entry", "check_input_shape", "example_input",
           "generate"]
