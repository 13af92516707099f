"""`hf:` MODEL sources: a Hugging Face `config.json` (or a local model folder) planned with no Python written.

    hf:path/to/config.json?task=causal-lm&seq-len=128&global-batch=8
    hf:path/to/model-folder?task=image-classification&global-batch=64

The whole source string is what a plan records (`model.source`), so `execute`, `validate` and the pre-flight
check rebuild the same model from it, as they do a `file.py:function` source. The model is built from the config
with transformers' Auto classes (`AutoConfig.for_model`, `AutoModelFor*.from_config`): no weight file is read and
nothing is downloaded, even when the folder holds weights; the runtime initialises it randomly from the plan's
seed. Under the planner's `torch.device("meta")` nothing is allocated, so a Llama-3-8B config plans on a laptop.

Tasks and what is synthesised for them (deterministic in `step`, so every rank builds the same global batch):
- `causal-lm`: arithmetic token rows (start + stride * position, mod vocab), next-token cross-entropy.
- `masked-lm`: the same rows with the same number of positions per row replaced by the mask token (15%, at least
  one); cross-entropy on those positions only (`ignore_index=-100`). Every row counts equally, so the mean over a
  data-parallel slice averaged over slices is the global mean.
- `image-classification`: random images (config's `image_size`, `num_channels`) whose class is the quadrant with
  the brightest patch, cross-entropy over `num_labels`.
The task defaults to the one the config's `architectures` names (`LlamaForCausalLM` -> causal-lm).
"""

from __future__ import annotations

import json
import types
from pathlib import Path
from urllib.parse import parse_qsl

import torch
import torch.nn.functional as F
from torch import nn

from planner.model_spec import ModelSpec, ModelSpecError

PREFIX = "hf:"
TASKS = ("causal-lm", "masked-lm", "image-classification")
_AUTO_CLASS = {"causal-lm": "AutoModelForCausalLM", "masked-lm": "AutoModelForMaskedLM",
               "image-classification": "AutoModelForImageClassification"}
_ARCHITECTURE_SUFFIX = {"ForCausalLM": "causal-lm", "LMHeadModel": "causal-lm", "ForMaskedLM": "masked-lm",
                        "ForImageClassification": "image-classification"}
MASKED_FRACTION = 0.15


def is_hf_source(source: str) -> bool:
    return source.startswith(PREFIX)


def hf_source(path: str, task: str | None = None, seq_len: int | None = None, global_batch: int = 8) -> str:
    """The source string for `path` (what `meshplan plan hf:PATH --seq-len S --global-batch B` records)."""
    query = [("task", task)] if task else []
    query += [("seq-len", str(seq_len))] if seq_len is not None else []
    query.append(("global-batch", str(global_batch)))
    return PREFIX + path + "?" + "&".join(f"{k}={v}" for k, v in query)


def _parse(source: str) -> tuple[str, dict[str, str]]:
    body = source[len(PREFIX):]
    path, _, query = body.partition("?")
    if not path:
        raise ModelSpecError(f"MODEL {source!r}: give a config.json or a model folder after hf:")
    options = dict(parse_qsl(query, keep_blank_values=True, strict_parsing=False))
    unknown = sorted(set(options) - {"task", "seq-len", "global-batch"})
    if unknown:
        raise ModelSpecError(f"MODEL {source!r}: unknown option(s) {unknown}; hf: sources take task, seq-len and "
                             "global-batch")
    return path, options


def _positive(source: str, options: dict[str, str], key: str, default: int | None) -> int | None:
    text = options.get(key)
    if text is None:
        return default
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise ModelSpecError(f"MODEL {source!r}: {key} must be a positive integer, got {text!r}")
    return value


def find_config_file(source: str, path_text: str, base_dir: Path | None) -> Path:
    """The config.json named by `path_text` (a file, or a folder holding config.json), looked up in the current
    directory and then, for a relative path, in `base_dir` (the plan's folder)."""
    candidates = [Path(path_text)]
    if base_dir is not None and not Path(path_text).is_absolute():
        candidates.append(base_dir / path_text)
    for candidate in candidates:
        if candidate.is_dir() and (candidate / "config.json").is_file():
            return (candidate / "config.json").resolve()
        if candidate.is_file():
            return candidate.resolve()
    raise ModelSpecError(f"MODEL {source!r}: no config.json at {path_text!r} (looked in "
                         f"{[str(c) for c in candidates]}); give a config.json file or a folder that holds one")


def load_config(source: str, config_file: Path):
    """transformers' config object for the file, or ModelSpecError naming what is wrong with it."""
    try:
        from transformers import AutoConfig
    except ImportError as err:
        raise ModelSpecError(f"MODEL {source!r}: hf: sources need transformers (pip install 'meshplan[hf]')") from err
    try:
        fields = json.loads(config_file.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ModelSpecError(f"MODEL {source!r}: {config_file} is not a readable JSON file: {err}") from err
    if not isinstance(fields, dict) or not isinstance(fields.get("model_type"), str):
        raise ModelSpecError(f"MODEL {source!r}: {config_file} has no \"model_type\" field; a Hugging Face "
                             "config.json names its architecture there (\"llama\", \"gpt2\", \"bert\", ...)")
    model_type = fields.pop("model_type")
    try:
        return AutoConfig.for_model(model_type, **fields)
    except (ValueError, KeyError, TypeError) as err:
        raise ModelSpecError(f"MODEL {source!r}: transformers does not know model_type {model_type!r} "
                             f"({type(err).__name__}: {str(err).splitlines()[0][:200]})") from err


def default_task(source: str, config) -> str:
    for architecture in getattr(config, "architectures", None) or []:
        for suffix, task in _ARCHITECTURE_SUFFIX.items():
            if architecture.endswith(suffix):
                return task
    raise ModelSpecError(f"MODEL {source!r}: the config names no architecture this tool knows the task of "
                         f"({getattr(config, 'architectures', None)}); add task=one of {list(TASKS)} "
                         "(meshplan plan --task ...)")


class LogitsOnly(nn.Module):
    """The transformers model with a forward that takes the task's inputs and returns only the logits (one
    tensor, what a ModelSpec's loss takes), without a KV cache."""

    def __init__(self, model: nn.Module, task: str):
        super().__init__()
        self.hf = model
        self.task = task
        _undecorate_rotary(model)

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        if self.task == "image-classification":
            return self.hf(pixel_values=inputs).logits
        if self.task == "causal-lm":
            return self.hf(input_ids=inputs, use_cache=False).logits
        return self.hf(input_ids=inputs).logits


def _undecorate_rotary(model: nn.Module) -> None:
    """Run rotary embeddings' forward without transformers' @torch.no_grad() wrapper: torch.export (the pipeline
    splitter) turns it into a submodule the split stage calls without arguments. Its inputs (positions, inv_freq)
    never need gradients, so the undecorated forward computes the same tables (as examples/hf_llama.py does)."""
    for module in model.modules():
        forward = getattr(type(module), "forward", None)
        if "Rotary" in type(module).__name__ and hasattr(forward, "__wrapped__"):
            module.forward = types.MethodType(forward.__wrapped__, module)


def _lm_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits.flatten(0, 1), targets.flatten())


def _masked_lm_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=-100)


def _token_rows(batch_size: int, step: int, length: int, vocab: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(1000 + step)
    start = torch.randint(0, vocab, (batch_size, 1), generator=gen)
    stride = torch.randint(1, 4, (batch_size, 1), generator=gen)
    return (start + stride * torch.arange(length)) % vocab


def _text_spec(source: str, config, task: str, seq_len: int | None, global_batch: int, model: nn.Module):
    vocab = getattr(config, "vocab_size", None)
    if not isinstance(vocab, int) or vocab < 2:
        raise ModelSpecError(f"MODEL {source!r}: the config has no vocab_size, which a {task} task needs")
    if seq_len is None:
        raise ModelSpecError(f"MODEL {source!r}: a {task} model needs a sequence length (--seq-len S)")
    max_positions = getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None)
    if isinstance(max_positions, int) and seq_len > max_positions:
        raise ModelSpecError(f"MODEL {source!r}: seq-len {seq_len} is longer than the config's "
                             f"{max_positions} positions; lower --seq-len or raise max_position_embeddings")
    if task == "causal-lm":
        def make_batch(batch_size: int, step: int):
            tokens = _token_rows(batch_size, step, seq_len + 1, vocab)
            return (tokens[:, :-1],), tokens[:, 1:]

        return ModelSpec(model=model, make_batch=make_batch, loss_fn=_lm_loss, global_batch_size=global_batch)
    mask_id = getattr(config, "mask_token_id", None)
    mask_id = mask_id if isinstance(mask_id, int) and 0 <= mask_id < vocab else vocab - 1
    masked = max(1, round(MASKED_FRACTION * seq_len))

    def make_masked_batch(batch_size: int, step: int):
        tokens = _token_rows(batch_size, step, seq_len, vocab)
        gen = torch.Generator().manual_seed(3000 + step)
        positions = torch.rand(batch_size, seq_len, generator=gen).argsort(dim=1)[:, :masked]
        where = torch.zeros(batch_size, seq_len, dtype=torch.bool).scatter_(1, positions, True)
        return (tokens.masked_fill(where, mask_id),), tokens.masked_fill(~where, -100)

    return ModelSpec(model=model, make_batch=make_masked_batch, loss_fn=_masked_lm_loss,
                     global_batch_size=global_batch)


def _image_spec(source: str, config, global_batch: int, model: nn.Module) -> ModelSpec:
    size, channels = getattr(config, "image_size", None), getattr(config, "num_channels", 3)
    size = size[0] if isinstance(size, (list, tuple)) else size
    if not isinstance(size, int) or size < 2:
        raise ModelSpecError(f"MODEL {source!r}: the config has no image_size, which image-classification needs")
    classes = config.num_labels

    def make_batch(batch_size: int, step: int):
        gen = torch.Generator().manual_seed(2000 + step)
        images = torch.randn(batch_size, channels, size, size, generator=gen)
        labels = torch.randint(0, classes, (batch_size,), generator=gen)
        half = size // 2
        for i, label in enumerate(labels.tolist()):
            row, col = divmod(label % 4, 2)
            images[i, :, row * half:(row + 1) * half, col * half:(col + 1) * half] += 1.0
        return (images,), labels

    return ModelSpec(model=model, make_batch=make_batch, loss_fn=F.cross_entropy, global_batch_size=global_batch)


def config_file_of(source: str, base_dir: Path | None = None) -> Path:
    """The config.json an `hf:` source reads (what a plan's model.source_sha256 hashes)."""
    return find_config_file(source, _parse(source)[0], base_dir)


def load_hf_spec(source: str, base_dir: Path | None = None) -> ModelSpec:
    """Build the ModelSpec an `hf:` source names (on the current default device: meta when planning)."""
    path_text, options = _parse(source)
    config_file = find_config_file(source, path_text, base_dir)
    config = load_config(source, config_file)
    task = options.get("task") or default_task(source, config)
    if task not in TASKS:
        raise ModelSpecError(f"MODEL {source!r}: task must be one of {list(TASKS)}, got {task!r}")
    seq_len = _positive(source, options, "seq-len", None)
    global_batch = _positive(source, options, "global-batch", 8)
    # eager attention traces on fake tensors everywhere and is what the parity tests check; dropout off so a
    # training step is deterministic (the same on every plan, comparable with one process)
    config._attn_implementation = "eager"
    for field in ("hidden_dropout_prob", "attention_probs_dropout_prob", "resid_pdrop", "embd_pdrop", "attn_pdrop",
                  "attention_dropout", "hidden_dropout", "dropout"):
        if isinstance(getattr(config, field, None), float):
            setattr(config, field, 0.0)
    config.use_cache = False
    import transformers

    auto = getattr(transformers, _AUTO_CLASS[task])
    try:
        model = auto.from_config(config, attn_implementation="eager")
    except ValueError as err:
        raise ModelSpecError(f"MODEL {source!r}: transformers has no {task} model for model_type "
                             f"{config.model_type!r} ({str(err).splitlines()[0][:200]}); pick another --task") from err
    wrapped = LogitsOnly(model, task)
    if task == "image-classification":
        return _image_spec(source, config, global_batch, wrapped)
    return _text_spec(source, config, task, seq_len, global_batch, wrapped)


def source_from_arguments(model: str, task: str | None, seq_len: int | None, global_batch: int | None) -> str:
    """The MODEL source `meshplan plan MODEL [--task T] [--seq-len S] [--global-batch B]` plans: an `hf:PATH`
    with the options folded into its query; other sources unchanged (and the options refused for them)."""
    if not is_hf_source(model):
        if (task, seq_len, global_batch) != (None, None, None):
            raise ModelSpecError(f"--task, --seq-len and --global-batch apply to hf: sources only; {model} sets "
                                 "its own batch in its ModelSpec")
        return model
    if (task, seq_len, global_batch) == (None, None, None):
        return model
    if "?" in model:
        raise ModelSpecError(f"MODEL {model!r} already carries options after '?'; give them there or as flags, "
                             "not both")
    return hf_source(model[len(PREFIX):], task, seq_len, 8 if global_batch is None else global_batch)
