"""AASIST and AASIST-L synthetic-speech detectors, reimplemented in torch.

Architecture from Jung, Heo, Tak, Shim, Chung, Lee, Yu, Evans, "AASIST: Audio Anti-Spoofing
using Integrated Spectro-Temporal Graph Attention Networks", ICASSP 2022 (arXiv:2110.01200),
and the authors' code and configs (github.com/clovaai/aasist, MIT, models/AASIST.py and
config/AASIST*.conf @a04c986), which define the published weights. This is our own torch
code written from that description; only the published state dicts are reused.

What the weights force on the structure:

- Module and parameter names are the upstream ones (``pos_S``, ``GAT_layer_S``,
  ``HtrgGAT_layer_ST11``, ``pool_hS1``...), because the state dicts are loaded strictly;
  the encoder is a Sequential of one-block Sequentials (keys ``encoder.<i>.0.*``).
- The upstream residual block computes BatchNorm + SELU of its input and then discards
  it: its first convolution reads the raw block input. The weights were trained that way,
  so ``bn1`` is loaded (strict) but never used; applying it would change every score.
- The sinc front-end is fixed (mel-spaced band-pass filters, not learned) and absent from
  the state dicts; it is computed here once, in float64, and kept as a float32 buffer so
  that it becomes an ONNX initializer.
- The fourth pool ratio and fourth temperature of each config are unused upstream, and
  all four heterogeneous layers share the third temperature; reproduced as is.

Inference only: no dropout, no frequency masking, no master-node defaults for training.
`AasistScorer` turns the two logits (index 1 = bona fide) into the synthetic score
``softmax(logits)[:, 0]``, so that every synthwatch detector means the same thing by
"score": higher = more likely synthetic.
"""

from __future__ import annotations

import pickle
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from synthwatch.errors import ModelUnavailable
from synthwatch.models.speech import INPUT_SAMPLES, SAMPLE_RATE


@dataclass(frozen=True)
class AasistConfig:
    """The upstream ``model_config`` hyper-parameters, under descriptive names."""

    name: str
    encoder: tuple[tuple[int, int], ...]
    """(in, out) channels of the residual blocks: ``filts[1:]`` with the last repeated,
    six blocks in all."""
    gat_dims: tuple[int, int]
    pool_ratios: tuple[float, float, float]
    """Fraction of nodes kept by the spectral pool, the temporal pool, and the pools
    after the first heterogeneous layers (upstream ``pool_ratios[:3]``)."""
    temperatures: tuple[float, float, float]
    """Attention temperatures of GAT-S, GAT-T and all HS-GAL layers."""
    sinc_filters: int = 70
    sinc_kernel: int = 129
    """Upstream asks for 128 taps and rounds up to an odd, symmetric 129."""


AASIST_CONFIG = AasistConfig(
    name="AASIST",
    encoder=((1, 32), (32, 32), (32, 64), (64, 64), (64, 64), (64, 64)),
    gat_dims=(64, 32),
    pool_ratios=(0.5, 0.7, 0.5),
    temperatures=(2.0, 2.0, 100.0),
)
AASIST_L_CONFIG = AasistConfig(
    name="AASIST-L",
    encoder=((1, 32), (32, 32), (32, 24), (24, 24), (24, 24), (24, 24)),
    gat_dims=(24, 32),
    pool_ratios=(0.4, 0.5, 0.7),
    temperatures=(2.0, 2.0, 100.0),
)


def sinc_filterbank(n_filters: int, kernel: int, sample_rate: int = SAMPLE_RATE) -> np.ndarray:
    """Hamming-windowed ideal band-pass filters with edges equally spaced on the mel scale.

    Bands tile 0 Hz .. Nyquist, so the first filter is a low-pass. Computed in float64
    and returned as float32 (n_filters, 1, kernel): upstream builds the same filters
    partly in float32, which differs by about 1e-7, far below the export tolerance.
    """
    if kernel % 2 == 0:
        raise ValueError(f"sinc kernel must be odd (symmetric), got {kernel}")
    nyquist = sample_rate / 2
    mel_top = 2595.0 * np.log10(1.0 + nyquist / 700.0)
    edges_hz = 700.0 * (10.0 ** (np.linspace(0.0, mel_top, n_filters + 1) / 2595.0) - 1.0)
    half = (kernel - 1) // 2
    taps = np.arange(-half, half + 1, dtype=np.float64)

    def low_pass(cutoff_hz: np.ndarray) -> np.ndarray:
        # Ideal low-pass impulse response, one row per cutoff.
        norm = 2.0 * cutoff_hz[:, None] / sample_rate
        result: np.ndarray = norm * np.sinc(norm * taps[None, :])
        return result

    band = low_pass(edges_hz[1:]) - low_pass(edges_hz[:-1])
    filters: np.ndarray = (band * np.hamming(kernel)[None, :])[:, None, :].astype(np.float32)
    return filters


def _bn_nodes(bn: nn.BatchNorm1d, x: torch.Tensor) -> torch.Tensor:
    """BatchNorm over the feature axis of (batch, nodes, features) graph tensors."""
    y: torch.Tensor = bn(x.transpose(1, 2)).transpose(1, 2)
    return y


def _pairwise(x: torch.Tensor) -> torch.Tensor:
    """(batch, nodes, dim) -> (batch, nodes, nodes, dim) with [b, i, j] = x_i * x_j."""
    return x.unsqueeze(2) * x.unsqueeze(1)


class _ResidualBlock(nn.Module):
    """Two (2, 3) convolutions with a skip connection, then max-pooling along time by 3."""

    def __init__(self, c_in: int, c_out: int, *, first: bool) -> None:
        super().__init__()
        if not first:
            # Loaded but unused: see the module docstring.
            self.bn1 = nn.BatchNorm2d(c_in)
        self.conv1 = nn.Conv2d(c_in, c_out, (2, 3), padding=(1, 1))
        self.bn2 = nn.BatchNorm2d(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, (2, 3), padding=(0, 1))
        self.conv_downsample: nn.Conv2d | None = (
            nn.Conv2d(c_in, c_out, (1, 3), padding=(0, 1)) if c_in != c_out else None
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # In place where the input is a fresh intermediate: the first blocks' maps are
        # tens of MB per window, and each avoided allocation saves page-faulting it in.
        out = self.conv2(F.selu(self.bn2(self.conv1(x)), inplace=True))
        out += x if self.conv_downsample is None else self.conv_downsample(x)
        return F.max_pool2d(out, (1, 3))


class _GraphAttention(nn.Module):
    """Graph attention over one homogeneous graph (GAT-S or GAT-T), fully connected."""

    def __init__(self, in_dim: int, out_dim: int, temperature: float) -> None:
        super().__init__()
        self.att_proj = nn.Linear(in_dim, out_dim)
        self.att_weight = nn.Parameter(torch.empty(out_dim, 1))
        self.proj_with_att = nn.Linear(in_dim, out_dim)
        self.proj_without_att = nn.Linear(in_dim, out_dim)
        self.bn = nn.BatchNorm1d(out_dim)
        self.temperature = temperature
        nn.init.xavier_normal_(self.att_weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits = (torch.tanh(self.att_proj(_pairwise(x))) @ self.att_weight).squeeze(-1)
        # Each node's weights over its neighbours sum to 1.
        att = torch.softmax(logits / self.temperature, dim=-1)
        out = self.proj_with_att(att @ x) + self.proj_without_att(x)
        return F.selu(_bn_nodes(self.bn, out))


class _HeteroGraphAttention(nn.Module):
    """HS-GAL: attention over the union of a temporal and a spectral graph, plus a stack
    (master) node that attends to every node.

    Node pairs within the first graph, within the second, and across the two are scored
    with separate attention vectors (``att_weight11``, ``22``, ``12``); the master node's
    attention uses its own projections (the ``*M`` parameters).
    """

    def __init__(self, in_dim: int, out_dim: int, temperature: float) -> None:
        super().__init__()
        self.proj_type1 = nn.Linear(in_dim, in_dim)
        self.proj_type2 = nn.Linear(in_dim, in_dim)
        self.att_proj = nn.Linear(in_dim, out_dim)
        self.att_projM = nn.Linear(in_dim, out_dim)
        self.att_weight11 = nn.Parameter(torch.empty(out_dim, 1))
        self.att_weight22 = nn.Parameter(torch.empty(out_dim, 1))
        self.att_weight12 = nn.Parameter(torch.empty(out_dim, 1))
        self.att_weightM = nn.Parameter(torch.empty(out_dim, 1))
        self.proj_with_att = nn.Linear(in_dim, out_dim)
        self.proj_without_att = nn.Linear(in_dim, out_dim)
        self.proj_with_attM = nn.Linear(in_dim, out_dim)
        self.proj_without_attM = nn.Linear(in_dim, out_dim)
        self.bn = nn.BatchNorm1d(out_dim)
        self.temperature = temperature
        for w in (self.att_weight11, self.att_weight22, self.att_weight12, self.att_weightM):
            nn.init.xavier_normal_(w)

    def forward(
        self, x1: torch.Tensor, x2: torch.Tensor, master: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        n1 = x1.shape[1]
        x = torch.cat([self.proj_type1(x1), self.proj_type2(x2)], dim=1)

        # Master node: attention over all nodes (softmax along the node axis).
        m_logits = torch.tanh(self.att_projM(x * master)) @ self.att_weightM
        m_att = torch.softmax(m_logits / self.temperature, dim=1)
        new_master = self.proj_with_attM(m_att.transpose(1, 2) @ x) + self.proj_without_attM(master)

        # Node attention, block by block. Built by concatenation rather than by writing
        # into slices of a zero board, which is the same numbers and exports without
        # in-place index ops.
        pair = torch.tanh(self.att_proj(_pairwise(x)))
        top = torch.cat(
            [pair[:, :n1, :n1] @ self.att_weight11, pair[:, :n1, n1:] @ self.att_weight12], dim=2
        )
        bottom = torch.cat(
            [pair[:, n1:, :n1] @ self.att_weight12, pair[:, n1:, n1:] @ self.att_weight22], dim=2
        )
        logits = torch.cat([top, bottom], dim=1).squeeze(-1)
        att = torch.softmax(logits / self.temperature, dim=-1)
        out = self.proj_with_att(att @ x) + self.proj_without_att(x)
        out = F.selu(_bn_nodes(self.bn, out))
        return out[:, :n1], out[:, n1:], new_master


class _GraphPool(nn.Module):
    """Keep the highest-scoring fraction of `n_nodes` nodes, each scaled by its sigmoid score.

    The kept count is fixed at construction (node counts follow from the fixed input
    length), so the exported TopK has a constant k while the batch axis stays dynamic,
    and tracing never turns a tensor size into a Python int.
    """

    def __init__(self, in_dim: int, ratio: float, n_nodes: int) -> None:
        super().__init__()
        self.proj = nn.Linear(in_dim, 1)
        # Same float expression as upstream (e.g. int(29 * 0.7) = 20), so the same count.
        self.keep = max(int(n_nodes * ratio), 1)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        scores = torch.sigmoid(self.proj(h))
        _, idx = torch.topk(scores, self.keep, dim=1)
        return torch.gather(h * scores, 1, idx.expand(-1, -1, h.shape[2]))


class Aasist(nn.Module):
    """The AASIST network: raw 16 kHz waveform (batch, samples) -> 2 logits (batch, 2).

    Logit index 1 is bona fide speech. The input length is fixed at construction because
    the graph-pooling sizes follow from it; the weights were trained on `INPUT_SAMPLES`.
    """

    def __init__(
        self, config: AasistConfig = AASIST_CONFIG, input_samples: int = INPUT_SAMPLES
    ) -> None:
        super().__init__()
        self.config = config
        self.input_samples = input_samples
        n_spectral = config.sinc_filters // 3
        # Time frames: the valid sinc convolution, the (3, 3) pool, then a pool by 3 in
        # each residual block (64600 samples -> 29 frames).
        n_temporal = (input_samples - config.sinc_kernel + 1) // 3
        for _ in config.encoder:
            n_temporal //= 3
        if n_temporal < 1:
            raise ValueError(f"{input_samples} samples is too short for {config.name}")
        enc_dim = config.encoder[-1][1]
        gat0, gat1 = config.gat_dims
        r_s, r_t, r_h = config.pool_ratios
        t_s, t_t, t_h = config.temperatures

        self.sinc: torch.Tensor
        self.register_buffer(
            "sinc",
            torch.from_numpy(sinc_filterbank(config.sinc_filters, config.sinc_kernel)),
            persistent=False,
        )
        self.first_bn = nn.BatchNorm2d(1)
        self.encoder = nn.Sequential(
            *(
                nn.Sequential(_ResidualBlock(c_in, c_out, first=i == 0))
                for i, (c_in, c_out) in enumerate(config.encoder)
            )
        )

        self.pos_S = nn.Parameter(torch.zeros(1, n_spectral, enc_dim))
        self.master1 = nn.Parameter(torch.zeros(1, 1, gat0))
        self.master2 = nn.Parameter(torch.zeros(1, 1, gat0))

        self.GAT_layer_S = _GraphAttention(enc_dim, gat0, t_s)
        self.GAT_layer_T = _GraphAttention(enc_dim, gat0, t_t)
        self.HtrgGAT_layer_ST11 = _HeteroGraphAttention(gat0, gat1, t_h)
        self.HtrgGAT_layer_ST12 = _HeteroGraphAttention(gat1, gat1, t_h)
        self.HtrgGAT_layer_ST21 = _HeteroGraphAttention(gat0, gat1, t_h)
        self.HtrgGAT_layer_ST22 = _HeteroGraphAttention(gat1, gat1, t_h)

        self.pool_S = _GraphPool(gat0, r_s, n_spectral)
        self.pool_T = _GraphPool(gat0, r_t, n_temporal)
        self.pool_hS1 = _GraphPool(gat1, r_h, self.pool_S.keep)
        self.pool_hT1 = _GraphPool(gat1, r_h, self.pool_T.keep)
        self.pool_hS2 = _GraphPool(gat1, r_h, self.pool_S.keep)
        self.pool_hT2 = _GraphPool(gat1, r_h, self.pool_T.keep)

        self.out_layer = nn.Linear(5 * gat1, 2)

    def _branch(
        self,
        first: _HeteroGraphAttention,
        second: _HeteroGraphAttention,
        pool_s: _GraphPool,
        pool_t: _GraphPool,
        nodes_t: torch.Tensor,
        nodes_s: torch.Tensor,
        master: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """One of the two parallel HS-GAL inference paths: HS-GAL, pool, residual HS-GAL."""
        t, s, m = first(nodes_t, nodes_s, master)
        t, s = pool_t(t), pool_s(s)
        t_aug, s_aug, m_aug = second(t, s, m)
        return t + t_aug, s + s_aug, m + m_aug

    def forward(self, waveform: torch.Tensor) -> torch.Tensor:
        # Not checked during export: the tracer would turn the test into a graph constant
        # (with a warning), and the export's example input has the right length anyway.
        if not torch.onnx.is_in_onnx_export() and (
            waveform.dim() != 2 or waveform.shape[1] != self.input_samples
        ):
            raise ValueError(
                f"expected (batch, {self.input_samples}) waveforms, got {tuple(waveform.shape)}"
            )
        x = F.conv1d(waveform.unsqueeze(1), self.sinc)  # (N, filters, time)
        x = F.max_pool2d(x.abs().unsqueeze(1), (3, 3))  # (N, 1, 23, time')
        x = F.selu(self.first_bn(x))
        e = self.encoder(x).abs()  # (N, C, 23, frames)

        spectral = e.amax(dim=3).transpose(1, 2) + self.pos_S  # (N, 23, C)
        temporal = e.amax(dim=2).transpose(1, 2)  # (N, frames, C)
        nodes_s = self.pool_S(self.GAT_layer_S(spectral))
        nodes_t = self.pool_T(self.GAT_layer_T(temporal))

        t1, s1, m1 = self._branch(
            self.HtrgGAT_layer_ST11,
            self.HtrgGAT_layer_ST12,
            self.pool_hS1,
            self.pool_hT1,
            nodes_t,
            nodes_s,
            self.master1,
        )
        t2, s2, m2 = self._branch(
            self.HtrgGAT_layer_ST21,
            self.HtrgGAT_layer_ST22,
            self.pool_hS2,
            self.pool_hT2,
            nodes_t,
            nodes_s,
            self.master2,
        )
        # Max graph operation: element-wise max of the two branches.
        t = torch.maximum(t1, t2)
        s = torch.maximum(s1, s2)
        master = torch.maximum(m1, m2)

        readout = torch.cat(
            [t.abs().amax(dim=1), t.mean(dim=1), s.abs().amax(dim=1), s.mean(dim=1), master[:, 0]],
            dim=1,
        )
        logits: torch.Tensor = self.out_layer(readout)
        return logits


class AasistScorer(nn.Module):
    """(N, `INPUT_SAMPLES`) float32 16 kHz mono -> (N,) synthetic score in [0, 1].

    The score is the softmax probability of the spoof class, so it is comparable across
    synthwatch detectors; the raw logits stay available through ``.model``.
    """

    def __init__(self, model: Aasist) -> None:
        super().__init__()
        self.model = model

    def forward(self, waveform: torch.Tensor) -> torch.Tensor:
        return torch.softmax(self.model(waveform), dim=1)[:, 0]


def load_aasist(path: Path, config: AasistConfig) -> AasistScorer:
    """Build `config`'s network, load the upstream state dict strictly, return the scorer.

    Raises `ModelUnavailable` if the file is not a loadable state dict or does not fit
    the architecture (a missing, unexpected or mis-shaped key), so that a wrong or damaged
    weights file fails at load time rather than producing plausible-looking scores.
    """
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except (OSError, RuntimeError, EOFError, ValueError, pickle.UnpicklingError) as exc:
        raise ModelUnavailable(f"{path}: cannot read torch weights: {exc}") from exc
    if not isinstance(state, dict):
        raise ModelUnavailable(f"{path}: expected a state dict, found {type(state).__name__}")
    model = Aasist(config)
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise ModelUnavailable(f"{path}: weights do not fit {config.name}: {exc}") from exc
    return AasistScorer(model).eval()


def build_aasist(paths: Sequence[Path]) -> nn.Module:
    """Registry builder: ``paths[0]`` is the upstream AASIST.pth."""
    return load_aasist(paths[0], AASIST_CONFIG)


def build_aasist_l(paths: Sequence[Path]) -> nn.Module:
    """Registry builder: ``paths[0]`` is the upstream AASIST-L.pth."""
    return load_aasist(paths[0], AASIST_L_CONFIG)
