"""The built-in model, served when `ffai-worker` gets no `--model`.

Karpathy's stories260K (llama2.c, MIT licence; see `default_model/LICENSE`):
a real 260K-parameter Llama trained on TinyStories, about 1 MB, shipped as
package data so a fresh machine writes a little story offline.
"""

from __future__ import annotations

from pathlib import Path

BUILTIN_MODEL_NAME = "tinystories-260k"
BUILTIN_MODEL_DIR = Path(__file__).resolve().parents[1] / "default_model"
BUILTIN_MODEL_NOTE = (
    f"no --model: using the built-in model {BUILTIN_MODEL_NAME} (Karpathy's stories260K, "
    "MIT licence: it writes short children's stories); --model <folder or hub id> picks another."
)
