"""Probes: the paper's two-stage token- and layer-selective aggregators (design.md §2).

Every probe maps the hidden states of one batch to class logits::

    hidden (B, L1, T, d), mask (B, T)  ->  logits (B, C)

L1 is the number of layers used (L+1 with the embedding output), C = 1 for a binary task (one logit)
or the number of classes. Three stages, the same operator type in both aggregation stages:

    stage 1, per layer:    v[l] = token_blocks[l](hidden[:, l], mask)     one block per layer, (B, d)
    stage 2, over layers:  v    = layer_block(stack(v[0..L1-1]))          one shared block,     (B, d)
    head:                  logits = head(v)                               Linear(d, C)

``Probe.layer_summary`` is stage 1 for one layer and ``Probe.head_logits`` stage 2 + head, so that serving
(``probecache.serve``) can run stage 1 inside the LLM's forward hooks, one layer at a time.

Operators (``PROBES``): ``pooling`` (masked mean or max, no parameters), ``scoring`` (scoring-attention
gate s_i = tanh(w^T x_i), alpha = softmax(s), v = sum_i alpha_i x_i; one w per block) and ``mha``
(downcast multi-head attention d -> d/downcast, SDPA, back to d, then masked mean or max pooling).

Decisions the paper leaves open, made here:

- Padding never reaches the arithmetic: padded positions of ``hidden`` are zeroed before stage 1 (so even
  inf or NaN garbage cannot leak through ``0 * x``), and every reduction is masked as well (mean divides
  by the valid count, max fills with -inf, the gate puts -inf scores on padding).
- Padding mask inside MHA: a key padding mask, (B, 1, 1, T) boolean ``attn_mask`` for SDPA. Padded
  *query* rows are computed (they attend to the valid keys) and then excluded by the masked pooling.
  An example with no valid token pools to the zero vector instead of NaN (its keys are all unmasked
  for SDPA, whose output for an all-masked row differs between backends).
- Stage 2 sees the L1 layer summaries as an unordered set: no layer position embedding is added
  (the paper describes none). Layer identity still reaches stage 2 for MHA through the per-layer
  stage-1 modules; for pooling and scoring only through the content of each layer's summary.
- The MHA projections carry biases (nn.Linear defaults): 4*d*d_inner weights + 3*d_inner + d biases per
  module, L1+1 modules. The paper quotes weights only; ``count_parameters(include_bias=False)`` gives those.
- Scoring gates start at w = 0, i.e. as plain mean pooling in both stages (the init is deterministic
  and the gradient at w = 0 is not zero). Because tanh bounds the scores to [-1, 1], one gate can up-weight
  a token at most e^2 ~ 7.4 times over another: that is the paper's definition and kept as is.
- Input normalisation (``norm="rms"``, the default; not in the paper): every token vector of every layer is
  divided by its root mean square before stage 1, as the LLM's own RMSNorm does before each block. Llama-family
  residual streams carry "massive activations" (SmolLM2-135M, layers 5-25: one dimension reaches 2.6e4 on the
  first token and holds 98 % of the layer's energy); raw, they saturate the tanh gate and the attention
  softmax. Measured on Rotten Tomatoes (1,600 train, validation accuracy): scoring 0.835 -> 0.91, MHA/32
  ~0.65 at any lr -> 0.90-0.92. ``norm="none"`` keeps the paper's raw inputs.
- Compute dtype: ``hidden`` of any dtype is cast to the probe's parameter dtype (float32 unless the
  caller converted the probe), one layer at a time so a bf16 batch is never widened whole.
- A binary task (n_classes = 2) has a single logit (use BCE-with-logits); more classes one logit each.
- Artifacts: safetensors weights with the ProbeConfig as JSON in the file's metadata; no pickle.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import nn

from .choices import NORMS, POOLS  # noqa: F401  (defined there: the CLI's --help names them without torch)
from .errors import TrainError

FORMAT_VERSION = "1"
_CONFIG_KEY = "probecache.probe_config"
_RMS_EPS = 1e-6
_FORMAT_KEY = "probecache.probe_format"
MAX_HEADER_BYTES = 1 << 24  # a probe's safetensors header (tensor names, offsets, config) is a few KB


@dataclass(frozen=True)
class ProbeConfig:
    """Everything that fixes a probe's architecture (and so the shapes of its weights)."""

    name: str  # a key of PROBES: "pooling", "scoring" or "mha"
    n_layers: int  # L1: hidden-state tensors per example that the probe reads (L+1 for all layers)
    hidden_size: int  # d
    n_classes: int = 2  # 2 -> one logit
    pool: str = "mean"  # "mean" | "max": the pooling probe's operator, and how mha pools its outputs
    downcast: int = 8  # mha: d_inner = hidden_size / downcast
    heads: int = 8  # mha: attention heads, each of size d_inner / heads
    norm: str = "rms"  # "rms": every token vector scaled to unit RMS before stage 1 (parameter-free); "none"

    def __post_init__(self) -> None:
        if self.name not in PROBES:
            raise TrainError(f"unknown probe {self.name!r}: choose one of {', '.join(PROBES)}")
        if self.pool not in POOLS:
            raise TrainError(f"unknown pool {self.pool!r}: choose one of {', '.join(POOLS)}")
        if self.norm not in NORMS:
            raise TrainError(f"unknown norm {self.norm!r}: choose one of {', '.join(NORMS)}")
        for field in ("n_layers", "hidden_size", "downcast", "heads"):
            if getattr(self, field) < 1:
                raise TrainError(f"{field} must be a positive integer, got {getattr(self, field)}")
        if self.n_classes < 2:
            raise TrainError(f"n_classes must be at least 2, got {self.n_classes}")
        if self.name == "mha":
            if self.hidden_size % self.downcast:
                divisors = [f for f in (2, 4, 8, 16, 32, 64) if self.hidden_size % f == 0]
                raise TrainError(f"downcast {self.downcast} does not divide hidden_size {self.hidden_size}: "
                                 f"choose a downcast that divides it (e.g. {divisors or [1]})")
            if self.d_inner % self.heads:
                divisors = [h for h in (1, 2, 4, 8, 16) if self.d_inner % h == 0]
                raise TrainError(f"heads {self.heads} does not divide d_inner = hidden_size / downcast = "
                                 f"{self.d_inner}: choose heads that divide it (e.g. {divisors}) "
                                 f"or a smaller downcast")

    @property
    def n_outputs(self) -> int:
        return 1 if self.n_classes == 2 else self.n_classes

    @property
    def d_inner(self) -> int:
        return self.hidden_size // self.downcast


# --- masked reductions: x (B, N, d), mask (B, N) with True = valid, or None = all valid -> (B, d) ---

def masked_mean(x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    if mask is None:
        return x.mean(dim=1)
    # masked_fill, not x * mask: 0 * inf is NaN
    total = x.masked_fill(~mask[..., None], 0.0).sum(dim=1)  # (B, d)
    count = mask.sum(dim=1, keepdim=True).clamp(min=1)  # (B, 1); an empty example pools to 0, not NaN
    return total / count


def masked_max(x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    if mask is None:
        return x.amax(dim=1)
    top = x.masked_fill(~mask[..., None], float("-inf")).amax(dim=1)  # (B, d)
    return top.masked_fill(~mask.any(dim=1, keepdim=True), 0.0)  # an empty example would be all -inf


POOL_FNS = {"mean": masked_mean, "max": masked_max}


# --- blocks: (B, N, d) + mask (B, N) or None -> (B, d); stage 1 has N = T, stage 2 has N = L1 ---

class Pool(nn.Module):
    """Direct pooling: no parameters."""

    def __init__(self, pool: str):
        super().__init__()
        self.pool = pool

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        return POOL_FNS[self.pool](x, mask)


class ScoringGate(nn.Module):
    """Scoring-attention gate: s_i = tanh(w^T x_i) (no bias), alpha = softmax(s) over valid i, v = sum alpha_i x_i."""

    def __init__(self, d: int):
        super().__init__()
        self.w = nn.Parameter(torch.zeros(d))  # w = 0: starts as mean pooling

    def weights(self, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        s = torch.tanh(x @ self.w)  # (B, N)
        if mask is None:
            return torch.softmax(s, dim=-1)
        alpha = torch.softmax(s.masked_fill(~mask, float("-inf")), dim=-1)  # (B, N)
        return alpha.masked_fill(~mask, 0.0)  # an all-padding row is NaN after softmax: make it 0

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        return torch.einsum("bn,bnd->bd", self.weights(x, mask), x)  # (B, d)


class DowncastMHA(nn.Module):
    """Multi-head self-attention in d_inner = d / downcast dimensions, projected back to d, then pooled."""

    def __init__(self, d: int, d_inner: int, heads: int, pool: str):
        super().__init__()
        self.heads, self.pool = heads, pool
        self.q = nn.Linear(d, d_inner)
        self.k = nn.Linear(d, d_inner)
        self.v = nn.Linear(d, d_inner)
        self.out = nn.Linear(d_inner, d)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        B, N, _ = x.shape

        def split(t: torch.Tensor) -> torch.Tensor:  # (B, N, d_inner) -> (B, H, N, d_inner / H)
            return t.view(B, N, self.heads, -1).transpose(1, 2)

        q, k, v = split(self.q(x)), split(self.k(x)), split(self.v(x))
        attn_mask = None
        if mask is not None:
            # key padding mask, True = key takes part; an example with no valid token attends to its (zeroed)
            # positions instead of hitting an all-masked softmax (NaN on some backends); pooling drops it anyway
            keys = mask | ~mask.any(dim=1, keepdim=True)  # (B, N)
            attn_mask = keys[:, None, None, :]  # (B, 1, 1, N), broadcast over heads and queries
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)  # (B, H, N, d_inner / H)
        y = self.out(y.transpose(1, 2).reshape(B, N, -1))  # (B, N, d)
        return POOL_FNS[self.pool](y, mask)  # padded query rows are excluded here


# --- probes ---

class Probe(nn.Module):
    """Two-stage aggregator + linear head. Subclasses only say which block they use."""

    def __init__(self, config: ProbeConfig):
        super().__init__()
        self.config = config
        self.token_blocks = nn.ModuleList(self.make_block() for _ in range(config.n_layers))  # stage 1
        self.layer_block = self.make_block()  # stage 2
        self.head = nn.Linear(config.hidden_size, config.n_outputs)

    def make_block(self) -> nn.Module:
        raise NotImplementedError

    def layer_summaries(self, hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Stage 1: hidden (B, L1, T, d), mask (B, T) -> one vector per layer (B, L1, d)."""
        cfg = self.config
        if hidden.ndim != 4 or hidden.shape[1] != cfg.n_layers or hidden.shape[3] != cfg.hidden_size:
            raise ValueError(f"hidden must be (B, L1={cfg.n_layers}, T, d={cfg.hidden_size}), "
                             f"got {tuple(hidden.shape)}")
        if mask.shape != (hidden.shape[0], hidden.shape[2]):
            raise ValueError(f"mask must be (B, T) = {(hidden.shape[0], hidden.shape[2])}, got {tuple(mask.shape)}")
        mask = mask.to(device=hidden.device, dtype=torch.bool)
        return torch.stack([self.layer_summary(layer, hidden[:, layer], mask) for layer in range(cfg.n_layers)],
                           dim=1)  # (B, L1, d)

    def layer_summary(self, index: int, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Stage 1 for one layer: x (B, T, d) any dtype, mask (B, T) bool (True = valid) -> (B, d).

        ``index`` is the position of the layer in the probe's own layer list (0..L1-1), not a model layer number.
        Serving calls this inside a forward hook, one layer at a time, so no copy of all layers is ever kept.
        """
        # cast one layer at a time (a bf16 batch is never widened whole); zero padding so no garbage,
        # however large, can reach a sum or a matmul
        x = x.to(self.head.weight.dtype).masked_fill(~mask[..., None], 0.0)  # (B, T, d)
        if self.config.norm == "rms":  # padded rows stay 0 (0 * rsqrt(eps))
            x = x * torch.rsqrt(x.pow(2).mean(dim=-1, keepdim=True) + _RMS_EPS)
        return self.token_blocks[index](x, mask)  # (B, d)

    def head_logits(self, summaries: torch.Tensor) -> torch.Tensor:
        """Stage 2 + head: the L1 layer summaries (B, L1, d) -> logits (B, C)."""
        v = self.layer_block(summaries, None)  # (B, d); every layer is valid
        return self.head(v)  # (B, C)

    def forward(self, hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return self.head_logits(self.layer_summaries(hidden, mask))  # (B, C)

    def layer_weights(self, hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Stage-2 attention weight of every layer (B, L1): only probes with a scoring gate have them."""
        raise NotImplementedError(f"the {self.config.name} probe has no layer weights; use the scoring probe")


class PoolingProbe(Probe):
    def make_block(self) -> nn.Module:
        return Pool(self.config.pool)


class ScoringProbe(Probe):
    def make_block(self) -> nn.Module:
        return ScoringGate(self.config.hidden_size)

    def layer_weights(self, hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return self.layer_block.weights(self.layer_summaries(hidden, mask), None)  # (B, L1)


class MHAProbe(Probe):
    def make_block(self) -> nn.Module:
        cfg = self.config
        return DowncastMHA(cfg.hidden_size, cfg.d_inner, cfg.heads, cfg.pool)


PROBES: dict[str, type[Probe]] = {"pooling": PoolingProbe, "scoring": ScoringProbe, "mha": MHAProbe}


def build_probe(config: ProbeConfig) -> Probe:
    """A freshly initialised probe (on the current default device: ``with torch.device("meta")`` allocates nothing)."""
    return PROBES[config.name](config)


def count_parameters(probe: nn.Module, include_head: bool = True, include_bias: bool = True) -> int:
    """Trainable parameters; the paper's MHA sizes are ``include_head=False, include_bias=False``."""
    return sum(p.numel() for name, p in probe.named_parameters()
               if (include_head or not name.startswith("head.")) and (include_bias or not name.endswith(".bias")))


# --- artifacts: safetensors weights + the config as JSON in the file's metadata (no pickle) ---

def save_probe(probe: Probe, config: ProbeConfig, path: str | Path) -> None:
    if probe.config != config:
        raise ValueError(f"the probe was built from {probe.config}, not from the config given to save it ({config})")
    tensors = {name: t.detach().to("cpu").contiguous() for name, t in probe.state_dict().items()}
    metadata = {"format": "pt", _FORMAT_KEY: FORMAT_VERSION, _CONFIG_KEY: json.dumps(asdict(config), sort_keys=True)}
    save_file(tensors, str(path), metadata=metadata)


def check_safetensors(path: str | Path) -> None:
    """Refuse, in one line that names what the file is, anything but a plausible safetensors file, before a parser
    sees it. A safetensors file starts with its JSON header's length (8 bytes, little-endian u64) and the header
    itself ('{'); a pickle (torch.save's legacy format) starts with 0x80, a torch.save zip with 'PK'. Nothing here
    (or anywhere in probecache) unpickles: a pickle can run code when loaded."""
    path = Path(path)
    fix = "retrain the run, or restore its probe.safetensors from a copy"
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(9)
    except OSError as e:
        raise TrainError(f"{path} cannot be read ({e.strerror or e}): {fix}") from None
    if size == 0:
        raise TrainError(f"{path} is empty, not a safetensors file: {fix}")
    if head.startswith(b"PK\x03\x04"):
        raise TrainError(f"{path} is a zip archive (a torch.save checkpoint?), not a safetensors file; probecache "
                         f"never loads those: {fix}")
    if head[:1] == b"\x80" and head[1:2] in (b"\x02", b"\x03", b"\x04", b"\x05"):
        raise TrainError(f"{path} is a Python pickle, not a safetensors file; probecache never loads pickles (they "
                         f"can run code): {fix}")
    if size < 9:
        raise TrainError(f"{path} is not a safetensors file (it has only {size} bytes): {fix}")
    n = int.from_bytes(head[:8], "little")
    if n > MAX_HEADER_BYTES or 8 + n > size or head[8:9] != b"{":
        raise TrainError(f"{path} is not a safetensors file (its first 8 bytes announce a {n}-byte header in a "
                         f"{size}-byte file): {fix}")


def load_probe(path: str | Path, device: str | torch.device = "cpu") -> tuple[Probe, ProbeConfig]:
    """A saved probe and its config; a file that is not one is a one-line TrainError."""
    check_safetensors(path)
    try:
        return _load_probe(path, device)
    except SafetensorError as e:
        raise TrainError(f"{path} is not a readable safetensors file ({e}): retrain the run, or restore its "
                         f"probe.safetensors from a copy") from None


def _load_probe(path: str | Path, device: str | torch.device) -> tuple[Probe, ProbeConfig]:
    with safe_open(str(path), framework="pt", device=str(device)) as f:
        metadata = f.metadata() or {}
        if _CONFIG_KEY not in metadata:
            raise TrainError(f"{path} is not a probecache probe: its safetensors metadata has no {_CONFIG_KEY}")
        if metadata.get(_FORMAT_KEY) != FORMAT_VERSION:
            raise TrainError(f"{path} has probe format {metadata.get(_FORMAT_KEY)!r}; this version reads "
                             f"{FORMAT_VERSION!r}: upgrade probecache")
        try:
            config = ProbeConfig(**json.loads(metadata[_CONFIG_KEY]))
        except (TypeError, json.JSONDecodeError, TrainError) as e:
            raise TrainError(f"{path}: probe config does not match this version of probecache ({e})") from e
        if config.name not in PROBES:
            raise TrainError(f"{path}: unknown probe {config.name!r} (this version has {', '.join(PROBES)})")
        # clone: fresh, aligned memory (a tensor inside the file may be unaligned, and kernels chosen for it can
        # sum in another order: scores would differ from the trained probe's in the last bits)
        tensors = {name: f.get_tensor(name).clone() for name in f.keys()}
    with torch.device("meta"):  # no throw-away random init (283M parameters for mha/4 at d = 3072)
        probe = build_probe(config)
    try:
        probe.load_state_dict(tensors, strict=True, assign=True)
    except RuntimeError as e:  # torch lists every missing or misshapen tensor over several lines
        first = str(e).strip().splitlines()
        raise TrainError(f"{path}: its tensors do not fit its probe config ({first[-1].strip() if first else e}): "
                         f"retrain the run") from None
    return probe, config
