"""Saving and loading an `LTEModel`: full and light saves, adapters, base fingerprints.

`LTECheckpointMixin` holds what `lte.model.LTEModel` does with files: `save_pretrained` (atomic,
the config file last), `from_pretrained` (a full save alone, a light save onto its recorded base),
`from_base` and `load_trained_state`. The file names and the save format version live here.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from .config import CONFIG_FORMAT_VERSION
from .conversion.convert import base_fingerprint, reattach, weights_digest
from .errors import LTEError
from .version import __version__

if TYPE_CHECKING:  # typing.Self is Python 3.11+; annotations are never evaluated here
    from typing import Self

CONFIG_NAME = "lte_config.json"
ADAPTER_NAME = "lte_adapter.safetensors"
#: Module-name parts that wrappers add and state dicts leave out (FSDP1 units, activation checkpointing,
#: torch.compile): `layers.0._fsdp_wrapped_module.mlp` is `layers.0.mlp` in the state dict.
_WRAPPER_NAMES = ("_fsdp_wrapped_module", "_checkpoint_wrapped_module", "_orig_mod")

#: The LoRA adapters' weights (peft's names) of a save with adapters.
PEFT_NAME = "lte_peft.safetensors"
#: Saves with adapters are format 2, so that an older lte refuses them instead of loading them
#: without their adapters; the others stay format 1 (`CONFIG_FORMAT_VERSION`).
SAVE_FORMAT_VERSION = 2


def state_dict_name(module_name: str) -> str:
    """A module's name as its tensors' state-dict keys spell it (wrapper parts dropped)."""
    return ".".join(part for part in module_name.split(".") if part not in _WRAPPER_NAMES)


def _cpu(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.detach().cpu()


class LTECheckpointMixin:
    """Save / load for `LTEModel` (reads its layers, config, fingerprint and base model)."""

    def _meta(self, weights_permuted: bool, embedding: torch.Tensor | None = None) -> dict[str, Any]:
        spec = self._layers[0].spec
        archs = getattr(self.base_model.config, "architectures", None) or [type(self.base_model).__name__]
        meta = {
            "format_version": SAVE_FORMAT_VERSION if self.has_adapters else CONFIG_FORMAT_VERSION,
            "lte_version": __version__,
            "lte": self.lte_config.to_dict(),
            "stage": self.stage,
            "routing": self.routing,
            "spec": spec.to_dict(),
            "activation": self._layers[0].activation,
            "layers": [layer.name for layer in self._layers],
            "weights_permuted": weights_permuted,
            "base_architecture": archs[0],
            # A full save is its own base; a light save needs the base it was converted from.
            "base": (base_fingerprint(self.base_model, self._fingerprint["ffn_widths"], embedding=embedding)
                     if weights_permuted else self._fingerprint),
            "tokenizer_source": self._tokenizer_source(),
        }
        if not weights_permuted:  # a light save: where its base is, and whether that is permuted already
            meta.update(base_path=self.base_path, base_permuted=self._base_permuted)
        if self.has_adapters:
            from . import adapters

            meta["adapters"] = {"type": "lora", "peft_version": adapters._peft().__version__,
                                "config": adapters.config_to_dict(self._adapter_config)}
        return meta

    def _module_names(self) -> dict[int, str]:
        """id(module) -> its state-dict name in this model (names of sharding/checkpoint wrappers dropped)."""
        return {id(m): state_dict_name(name) for name, m in self.named_modules()}

    def _full_state(self, state_dict: dict[str, torch.Tensor] | None) -> dict[str, torch.Tensor]:
        """This model's full state dict: its own, or `state_dict` (e.g. gathered from FSDP shards) with the
        entries of parameters the model shares (tied embeddings) made one tensor again, as in its own."""
        if state_dict is None:
            return self.state_dict()
        state, first = dict(state_dict), {}
        for name, param in self.named_parameters(remove_duplicate=False):
            key = state_dict_name(name)
            owner = first.setdefault(id(param), key)
            if owner != key and owner in state and key in state:
                state[key] = state[owner]
        return state

    def _adapter_state(self, state_dict: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
        """Routers, permutations and expert sizes under the adapter file's names (`layers.{i}.*`)."""
        full = self._full_state(state_dict)
        names = self._module_names()
        state = {}
        for i, layer in enumerate(self._layers):
            owner = names[id(layer.input)]
            state[f"layers.{i}.router.weight"] = _cpu(full[f"{owner}.router.weight"]).contiguous()
            state[f"layers.{i}.perm"] = _cpu(full[f"{owner}.perm"])
            state[f"layers.{i}.expert_sizes"] = _cpu(full[f"{owner}.expert_sizes"])
        return state

    def _plain_state_dict(self, state_dict: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
        """The HF model's state dict under its own key names (wrappers removed, routers dropped)."""
        prefix = "base_model."
        names = self._module_names()
        lte_names = {names[id(layer.input)][len(prefix):] for layer in self._layers}  # relative to the HF model
        state = {}
        for key, value in self._full_state(state_dict).items():
            if not key.startswith(prefix):
                continue
            key = key[len(prefix):]
            owner, _, leaf = key.rpartition(".")
            if owner in lte_names and leaf in ("perm", "expert_sizes"):
                continue
            if key.endswith(".router.weight") and key[: -len(".router.weight")] in lte_names:
                continue
            state[key.replace(".base_layer.", ".")] = value
        return state

    def _input_embedding(self, state_dict: dict[str, torch.Tensor] | None) -> torch.Tensor | None:
        """The input embedding table from `state_dict` (None: read it from the model)."""
        if state_dict is None:
            return None
        return state_dict[self._module_names()[id(self.base_model.get_input_embeddings())] + ".weight"]

    def save_pretrained(self, save_directory: str | os.PathLike, light: bool | None = None,
                        state_dict: dict[str, torch.Tensor] | None = None, tokenizer: Any = None,
                        **_: Any) -> None:
        """Save to a directory. Files are written to a temporary folder first and moved in with
        `lte_config.json` last, so a crash never leaves a half-written file under a final name.

        Full (default without adapters): the HF model (safetensors, permuted weights) +
        `lte_config.json` + `lte_adapter.safetensors`; reload with `LTEModel.from_pretrained(dir)` alone.
        Light (default with adapters): only what LTE adds (routers, permutations, config, stage, the
        adapters in `lte_peft.safetensors`) and the base's path (`base_path`); reload with
        `lte.load_model(dir)` (the base from its recorded path, refused when its fingerprint
        differs) or `LTEModel.from_base(base_model, dir)`.
        `state_dict`: this model's full state dict (`self.state_dict()` keys) to write instead of the
        module tensors, e.g. gathered on one process from a model sharded by FSDP, whose own
        tensors are shards (full saves only).
        `tokenizer`: saved into the folder too, so it is self-sufficient; without one,
        `lte_config.json` records where the model came from (`tokenizer_source`) and
        `lte.loading.load_tokenizer` takes the tokenizer from there.
        """
        from safetensors.torch import save_file

        if light is None:
            light = self.has_adapters
        if light:
            if state_dict is not None:
                raise LTEError("save_pretrained(light=True) reads the live model; with a gathered state_dict "
                               "(sharded training) make a full save: save_pretrained(dir, state_dict=...)")
            self._check_base_unchanged()
        elif self.has_adapters:
            raise LTEError("a full save holds plain weights, not adapters: merge them first (merge_adapters()) "
                           "or save light (save_pretrained(dir), the default with adapters)")

        def write(folder: Path) -> None:
            if not light:
                self.base_model.save_pretrained(folder, state_dict=self._plain_state_dict(state_dict))
            save_file(self._adapter_state(state_dict), str(folder / ADAPTER_NAME))
            if tokenizer is not None:
                tokenizer.save_pretrained(folder)
            if self.has_adapters:
                from . import adapters

                save_file(adapters.adapter_state(self.base_model), str(folder / PEFT_NAME))
            meta = self._meta(weights_permuted=not light, embedding=self._input_embedding(state_dict))
            (folder / CONFIG_NAME).write_text(json.dumps(meta, indent=2))

        self._save_atomically(save_directory, write)

    def _check_base_unchanged(self) -> None:
        if self._base_changed:
            raise LTEError("the adapters were merged into the base weights: a light save would lose them. "
                           "Use save_pretrained(dir, light=False) (full save).")
        if weights_digest(self._layers) != self._digest:
            raise LTEError(
                "the base weights changed since conversion (training?): a light save keeps only the "
                "routers and permutations and would lose them. Use save_pretrained(dir) (full save)."
            )

    @staticmethod
    def _read(directory: str | os.PathLike) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
        from safetensors.torch import load_file

        d = Path(directory)
        if not d.is_dir():
            raise LTEError(f"{d} is not a directory; pass the directory an LTE model was saved to")
        if not (d / CONFIG_NAME).is_file():
            raise LTEError(
                f"{d} has no {CONFIG_NAME}: it is not an LTE model directory. For a plain HF model, "
                "load it with transformers and convert it with lte.get_lte_model."
            )
        meta = json.loads((d / CONFIG_NAME).read_text())
        if meta.get("format_version", 1) > SAVE_FORMAT_VERSION:
            raise LTEError(f"{d} was saved by a newer lte (format {meta['format_version']}); upgrade lte")
        if not (d / ADAPTER_NAME).is_file():
            raise LTEError(f"{d} is missing {ADAPTER_NAME} (the routers); the save is incomplete, re-save it")
        if meta.get("adapters") and not (d / PEFT_NAME).is_file():
            raise LTEError(f"{d} is missing {PEFT_NAME} (the adapters); the save is incomplete, re-save it")
        return meta, load_file(str(d / ADAPTER_NAME))

    @classmethod
    def _attach(cls, base: nn.Module, meta: dict[str, Any], state: dict[str, torch.Tensor], where: str,
                check_weights: bool) -> Self:
        cfg, layers = reattach(base, meta, state, where, check_weights)
        model = cls(base, cfg, layers, meta["base"], stage=meta.get("stage", "converted"))
        model._recorded_origin = meta.get("tokenizer_source")
        if not meta.get("weights_permuted", True):
            model.base_path = meta.get("base_path") or model.base_path
            model._base_permuted = bool(meta.get("base_permuted", False))
        if meta.get("adapters"):
            model._restore_adapters(meta["adapters"], Path(where))
        model.set_routing(meta.get("routing", "dense"))
        return model

    def _restore_adapters(self, info: dict[str, Any], directory: Path) -> None:
        """Put back the adapters a save holds (its config names every target in full)."""
        from safetensors.torch import load_file

        from . import adapters

        if info.get("type") != "lora":
            raise LTEError(f"{directory} holds adapters of type {info.get('type')!r}; this lte reads LoRA only")
        config = adapters.config_from_dict(info["config"])
        adapters.inject(self.base_model, config)
        adapters.load_adapter_state(self.base_model, load_file(str(directory / PEFT_NAME)), str(directory))
        self._adapter_config = config

    def load_trained_state(self, directory: str | os.PathLike) -> None:
        """Copy the routers, adapters and eta of a save of this same model (a checkpoint of its run) into
        it, without loading the base again. Refuses a save with other permutations or adapters."""
        from safetensors.torch import load_file

        meta, state = self._read(directory)
        for i, layer in enumerate(self._layers):
            perm = state.get(f"layers.{i}.perm")
            if perm is None or not torch.equal(perm.cpu(), layer.input.perm.cpu()):
                raise LTEError(f"{directory} was not saved from this model (FFN {i} has another permutation)")
        if bool(meta.get("adapters")) != self.has_adapters:
            raise LTEError(f"{directory} and this model differ in having adapters; resume the run that wrote it")
        with torch.no_grad():
            for i, layer in enumerate(self._layers):
                layer.router.weight.copy_(state[f"layers.{i}.router.weight"])
        if self.has_adapters:
            from . import adapters

            adapters.load_adapter_state(self.base_model, load_file(str(Path(directory) / PEFT_NAME)), str(directory))
        self.lte_config.eta = float(meta["lte"]["eta"])

    @classmethod
    def from_pretrained(cls, directory: str | os.PathLike, base: str | os.PathLike | None = None,
                        **hf_kwargs: Any) -> Self:
        """Load a save; HF keyword arguments (dtype, device_map) pass through.

        A full save loads alone. A light save loads its base from `base` (default: the path it
        recorded; a plain model loads in float32 unless `dtype` says otherwise) and refuses a base
        whose fingerprint differs.
        """
        meta, state = cls._read(directory)
        d = Path(directory)
        if not meta.get("weights_permuted", True) or not (d / "config.json").is_file():
            base = base or meta.get("base_path")
            if base is None:
                raise LTEError(
                    f"{d} is a light save (routers only) that does not record its base; load its base model "
                    "yourself and call LTEModel.from_base(base_model, dir)"
                )
            hf_kwargs.setdefault("dtype", torch.float32)
            return cls._attach(cls._load_base(base, meta, d, hf_kwargs), meta, state, str(d), check_weights=True)
        model = cls._attach(cls._hf_class(meta, d).from_pretrained(d, **hf_kwargs), meta, state, str(d),
                            check_weights=True)
        model.base_path, model._base_permuted = str(d.resolve()), True
        return model

    @staticmethod
    def _hf_class(meta: dict[str, Any], d: Path) -> type:
        import transformers

        arch = meta["base_architecture"]
        model_cls = getattr(transformers, arch, None)
        if model_cls is None:
            raise LTEError(f"{d} holds a {arch}, which this transformers version does not have; upgrade transformers")
        return model_cls

    @classmethod
    def _load_base(cls, base: str | os.PathLike, meta: dict[str, Any], d: Path, hf_kwargs: dict[str, Any]) -> nn.Module:
        """The base model of light save `d`, from `base` (a folder or hub name)."""
        try:
            return cls._hf_class(meta, d).from_pretrained(base, **hf_kwargs)
        except OSError as err:
            raise LTEError(f"{d} is a light save on the base model {base}, which could not be loaded "
                           f"({str(err).splitlines()[0]}); pass the base model's folder "
                           "(lte.load_model(dir, base=PATH), or --base-model PATH)") from err

    @classmethod
    def from_base(cls, base_model: nn.Module, directory: str | os.PathLike, check_weights: bool = True) -> Self:
        """Re-apply a light save (routers, permutations, config) to its base model, in place."""
        meta, state = cls._read(directory)
        if meta.get("weights_permuted", False):
            raise LTEError(f"{directory} is a full save; load it with LTEModel.from_pretrained(dir)")
        return cls._attach(base_model, meta, state, str(directory), check_weights)
