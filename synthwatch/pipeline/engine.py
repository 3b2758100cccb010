"""The scanning engine: the operators wired into one object both modes share.

Embedded mode (`synthwatch scan`) calls it directly; the streaming topology calls the
same methods from its agents, off the event loop. It owns the long-lived resources: the
model store, the face detector, the inference backend and the dynamic batcher, so
crops from concurrent items share batches.

`Engine` is wiring: it loads what the settings list (or refuses to start) and decides
which scoring step applies to an item; the steps themselves are the plain functions of
`operators/score.py` and `operators/signals/interpret.py`, and `analyze` runs them in
order, top to bottom.
"""

from __future__ import annotations

import difflib
import hashlib
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import structlog

from synthwatch.digest import file_sha256
from synthwatch.errors import ModelUnavailable, SynthwatchError
from synthwatch.models.registry import DEFAULT_CALIBRATION, ModelKind, ModelStore
from synthwatch.models.speech import SAMPLE_RATE
from synthwatch.operators import calibrate as calibrate_op
from synthwatch.operators import faces as faces_op
from synthwatch.operators import fuse, matching, phash, sandbox, score
from synthwatch.operators.batcher import Batcher
from synthwatch.operators.calibrate import Calibration
from synthwatch.operators.evidence import EvidenceFrame
from synthwatch.operators.explainer import Explainer
from synthwatch.operators.faces import FaceFinder
from synthwatch.operators.fetch import Fetched
from synthwatch.operators.hashlists import ListStore
from synthwatch.operators.infer import (
    Batch,
    OnnxNet,
    OnnxRuntimeBackend,
    resolve_backend_name,
    select_backend,
)
from synthwatch.operators.matching import Matcher
from synthwatch.operators.policy import Policy
from synthwatch.operators.redact import redact_url
from synthwatch.operators.report import AudioTrack, ReportContext, media_facts
from synthwatch.operators.sample import Sampled, SampleSettings
from synthwatch.operators.score import Detector, Scored
from synthwatch.operators.signals.interpret import forensic_signals, provenance_signals
from synthwatch.pipeline import metrics
from synthwatch.pipeline.settings import ModelSettings, Settings
from synthwatch.schemas import (
    MediaHash,
    MediaType,
    Provenance,
    Rescan,
    Verdict,
)

if TYPE_CHECKING:
    from synthwatch.pipeline.listfeed import ListFollower

log = structlog.get_logger("synthwatch.engine")

INCONCLUSIVE_NOTE = (
    "inconclusive: no detector that applies to this item produced a score, so there is "
    "no synthetic score; this is not evidence of authenticity"
)
UNSCORED_NOTE = (
    "no detector produced a score: the decision was forced by a finding alone, and "
    "there is no synthetic score"
)
SOUNDTRACK_NOTE = (
    "soundtrack not scored: the speech models misread real video soundtracks (music and "
    "room sound under the speech) as synthetic, see docs/EVALUATION.md"
)


@dataclass(frozen=True)
class Item:
    """What the engine needs to know about one fetched item."""

    id: str
    url: str
    source: str
    submitted_at: float
    sha256: str
    media_type: MediaType
    path: Path
    blob: str
    mime: str = ""
    rescan: Rescan | None = None
    """Set when `synthwatch rescan` sent the item again: carried into the verdict."""

    @classmethod
    def local(cls, fetched: Fetched, *, source: str) -> Item:
        """An item scanned in this process (embedded mode): its id is its hash, its
        blob the local file, and its URL shown without credentials or signatures."""
        return cls(
            id=fetched.sha256[:32],
            url=redact_url(fetched.url),
            source=source,
            submitted_at=time.time(),
            sha256=fetched.sha256,
            media_type=fetched.media_type,
            path=fetched.path,
            blob=str(fetched.path),
            mime=fetched.mime,
        )


@dataclass(frozen=True)
class Analysis:
    verdict: Verdict
    sampled: Sampled


def load_face_detector(store: ModelStore, settings: ModelSettings) -> tuple[FaceFinder, str]:
    """(detector, name): MTCNN when asked for or installed, else the LBP cascade."""
    choice = settings.face_detector
    if choice == "mtcnn" or (choice == "auto" and store.available("mtcnn")):
        pnet, rnet, onet = (
            OnnxNet(m, threads=settings.threads) for m in store.onnx_models("mtcnn")
        )
        return (
            faces_op.FaceDetector(
                (pnet, rnet, onet),
                min_size=settings.face_min_size,
                threshold=settings.face_threshold,
                max_side=settings.face_detect_max_side,
            ),
            "mtcnn",
        )
    cascade = faces_op.CascadeFaceDetector(
        min_size=settings.face_min_size, threads=settings.threads
    )
    return cascade, "lbp_cascade"


def store_scorer(store: ModelStore, threads: int) -> Callable[[str], Callable[[Batch], Batch]]:
    """Model name -> batch scorer on ONNX Runtime, from `store`'s verified weights."""

    def scorer(name: str) -> Callable[[Batch], Batch]:
        return OnnxRuntimeBackend(store.onnx_models(name)[0], threads=threads).run

    return scorer


def load_calibration(settings: ModelSettings) -> tuple[Calibration, str]:
    """(calibration, sha256 of its file or "" for none). An explicitly configured file
    that cannot be read is an error; the shipped default is used when present."""
    path = settings.calibration
    if path is None:
        if not DEFAULT_CALIBRATION.is_file():
            return calibrate_op.EMPTY, ""
        path = DEFAULT_CALIBRATION
    cal = calibrate_op.load(path)
    return cal, file_sha256(path)


MODEL_LISTS: dict[ModelKind, str] = {
    "face": "face_models",
    "image": "image_models",
    "audio": "audio_models",
}
"""The setting that lists each kind's models (`SYNTHWATCH_MODELS__<NAME>`)."""


def setting_name(kind: ModelKind) -> str:
    return f"SYNTHWATCH_MODELS__{MODEL_LISTS[kind].upper()}"


class Engine:
    def __init__(self, settings: Settings, *, cache_dir: Path | None = None) -> None:
        """Load every configured model, or refuse to start.

        Raises `ModelUnavailable` naming each configured model that is unknown, listed
        under the wrong kind, or whose weights are missing or altered, with where they
        were looked for and how to fix it. With `models.allow_missing`, models whose
        weights are missing or altered are left out instead (`missing` says why, and
        the verdicts of the items they would have scored say so); an unknown name is a
        typo and is refused either way.
        """
        self.settings = settings
        self.store = ModelStore(settings.model_dir, cache_dir=cache_dir)
        ms = settings.models
        self.backend_name = resolve_backend_name(ms.backend)
        self.missing: dict[str, tuple[ModelKind, str]] = {}
        """Listed models left out under `allow_missing`: name -> (kind, why)."""
        self.detectors: list[Detector] = []
        self.faces: FaceFinder | None = None
        self.face_detector_name = ""
        try:
            self._check_lists()
            # Every listed model's weights are verified before any is loaded, so a
            # missing one is reported in a moment, not after the others' sessions.
            present = [
                (name, kind)
                for kind, listing in MODEL_LISTS.items()
                for name in getattr(ms, listing)
                if self._present(name, kind)
            ]
            for name, kind in present:
                self._load(name, kind)
            if not self.detectors:
                raise ModelUnavailable(
                    "no detector could be loaded: "
                    + "; ".join(why for _kind, why in self.missing.values())
                )
            if self.by_kind("face"):
                self.faces, self.face_detector_name = load_face_detector(self.store, ms)
        except BaseException:
            self.close()
            raise
        for name, (_kind, why) in self.missing.items():
            log.warning("model left out", model=name, reason=why)
        self.calibration, cal_sha = load_calibration(ms)
        self.policy = Policy.from_settings(settings.policy)
        loaded = [d.name for d in self.detectors]
        if self.face_detector_name == "mtcnn":
            loaded.append("mtcnn")
        h = hashlib.sha256(self.store.model_set_version(loaded).encode())
        h.update(f"|{self.face_detector_name}|calibration={cal_sha}".encode())
        self.model_set = h.hexdigest()[:16]
        self._explainer: Explainer | None = None
        self.matcher: Matcher | None = None
        self._follower: ListFollower | None = None
        try:
            self._load_lists()
        except BaseException:
            self.close()
            raise

    def _load_lists(self) -> None:
        """The lists of known media, as `matching.lists` says: the local SQLite file
        (read once, now), the compacted Kafka topic (followed while running), or none."""
        ms = self.settings.matching
        if ms.lists == "off":
            return
        self.matcher = Matcher(ms)
        if ms.lists == "kafka":
            from synthwatch.pipeline.listfeed import ListFollower

            self._follower = ListFollower(self.settings, self.matcher)
            self._follower.start()
            return
        if ms.db.is_file():
            with ListStore(ms.db) as store:
                loaded = self.matcher.load(store)
            log.info("lists of known media loaded", entries=loaded, db=str(ms.db))
        metrics.HASHLIST_ENTRIES.labels("local").set(len(self.matcher))

    def _check_lists(self) -> None:
        """Every listed name must be a registered model of the list's kind: a typo
        would otherwise drop a detector without a word."""
        problems = []
        known = {spec.name: spec.kind for spec in self.store.specs}
        for kind, listing in MODEL_LISTS.items():
            for name in getattr(self.settings.models, listing):
                if known.get(name) == kind:
                    continue
                if name in known:
                    problems.append(
                        f"{name!r} in {setting_name(kind)} is a {known[name]} model; "
                        f"list it in {setting_name(known[name])}"
                        if known[name] in MODEL_LISTS
                        else f"{name!r} in {setting_name(kind)} is a {known[name]}, not a detector"
                    )
                    continue
                same_kind = [n for n, k in known.items() if k == kind]
                close = difflib.get_close_matches(name, same_kind, n=1)
                hint = f"did you mean {close[0]!r}? " if close else ""
                problems.append(
                    f"unknown model {name!r} in {setting_name(kind)}: {hint}"
                    f"known {kind} models: {', '.join(same_kind)}"
                )
        if problems:
            raise ModelUnavailable("; ".join(problems))

    def _present(self, name: str, kind: ModelKind) -> bool:
        """Whether `name`'s weights are in place and intact; raises `ModelUnavailable`
        when they are not, unless `allow_missing` (then False, and `missing` says why)."""
        try:
            self.store.resolve(name)
        except ModelUnavailable as exc:
            if not self.settings.models.allow_missing:
                raise ModelUnavailable(
                    f"{exc} (listed in {setting_name(kind)}; if the weights are "
                    "elsewhere, set SYNTHWATCH_MODEL_DIR; to scan without this model, "
                    "pass --allow-missing-models)"
                ) from None
            self.missing[name] = (kind, str(exc))
            return False
        return True

    def _load(self, name: str, kind: ModelKind) -> None:
        ms = self.settings.models
        spec = self.store.spec(name)
        max_batch = min(ms.max_batch, ms.audio_max_batch) if kind == "audio" else ms.max_batch
        backend = select_backend(
            ms.backend,
            onnx_path=lambda: self.store.onnx_path(name),
            onnx_model=lambda: self.store.onnx_models(name)[0],
            torch_module=lambda: self.store.load_torch(name),
            threads=ms.threads,
            max_batch=max_batch,
            engine_cache_dir=self.store.cache_dir / "tensorrt",
            # Audio models a window at a time: same speed, a third of the peak memory.
            rows_per_run=1 if kind == "audio" else 0,
        )
        weights_id = self.store.weights_id(name)
        version = f"{name}@{weights_id[:12]}"
        metrics.MODEL_INFO.labels(name, version, weights_id, backend.name).set(1)
        self.detectors.append(
            Detector(
                name=name,
                kind=kind,
                version=version,
                input_shape=spec.input_shape,
                weight=ms.weights.get(name, 1.0),
                view=spec.view,
                min_side=spec.min_side,
                backend=backend,
                batcher=Batcher(
                    backend.run,
                    max_batch=max_batch,
                    max_delay_ms=ms.max_delay_ms,
                    on_batch=metrics.batch_observer(name, backend.name, max_batch),
                    name=f"batcher-{name}",
                ),
            )
        )

    def by_kind(self, kind: ModelKind) -> list[Detector]:
        return [d for d in self.detectors if d.kind == kind]

    def close(self) -> None:
        follower, self._follower = getattr(self, "_follower", None), None
        if follower is not None:
            follower.close()
        for d in self.detectors:
            d.batcher.close()
            d.backend.close()
        self.detectors = []

    def __enter__(self) -> Engine:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def scorer(self, name: str) -> Callable[[Batch], Batch]:
        """Batch scorer of model `name` for explanations: the loaded detector's backend
        (same weights as the verdict), or an ONNX Runtime session of the store's."""
        for d in self.detectors:
            if d.name == name:
                return d.backend.run
        return store_scorer(self.store, self.settings.models.threads)(name)

    @property
    def explainer(self) -> Explainer:
        """Occlusion heatmaps and forensic maps for evidence, on the loaded detectors."""
        if self._explainer is None:
            self._explainer = Explainer(
                self.store,
                self.scorer,
                review_threshold=self.settings.policy.review_threshold,
                forensics=self.settings.models.forensics,
                sample=self.settings.sample,
            )
        return self._explainer

    # -- analysis ---------------------------------------------------------------------

    def analyze(self, item: Item) -> Analysis:
        """Sample the item; read its provenance; score its faces, whole frames, forensic
        features and audio; fuse the calibrated signals; decide."""
        sampled = self._sample(item)
        provenance, read = self._provenance(item)
        hashes, variants, hash_notes = self._hashes(item, sampled)
        matches = self.matcher.match(hashes, variants) if self.matcher is not None else []
        match_signals, match_notes = matching.match_signals(matches)
        known = Scored(signals=match_signals, notes=[*hash_notes, *match_notes])
        faces = self._faces(sampled)
        images = self._images(sampled)
        steps = [
            read,
            known,
            faces,
            images,
            self._forensics(item, sampled),
            self._audio(sampled),
        ]
        signals = fuse.calibrate([s for step in steps for s in step.signals], self.calibration)
        fused = fuse.combine(signals, prior=self.calibration.prior)
        decision = self.policy.decide(fused.score, minimum=fused.minimum)
        notes = [
            *sampled.notes,
            *(note for step in steps for note in step.notes),
            *self._missing_notes(sampled),
        ]
        if fused.score is None:
            notes.append(INCONCLUSIVE_NOTE if decision == "inconclusive" else UNSCORED_NOTE)
        top = max(
            (s for s in signals if s.name in fused.decided_by),
            key=lambda s: s.score,
            default=None,
        )
        verdict = Verdict(
            id=item.id,
            url=item.url,
            source=item.source,
            submitted_at=item.submitted_at,
            sha256=item.sha256,
            media_type=sampled.media_type,
            synthetic_score=None if fused.score is None else round(fused.score, 6),
            decision=decision,
            signals=signals,
            segments=list(top.segments) if top is not None else [],
            frames=score.merge_frames(faces.frames, images.frames, signals, self.calibration),
            duration_s=round(sampled.duration_s, 3),
            faces_found=faces.distinct_faces,
            face_detections=faces.face_detections,
            has_audio=sampled.audio is not None,
            model_set=self.model_set,
            policy_version=self.policy.version,
            blob=item.blob,
            notes=notes,
            decided_by=fused.decided_by,
            provenance=provenance,
            detected_at=round(time.time(), 3),
            hashes=hashes,
            matches=matches,
            rescan=item.rescan,
        )
        return Analysis(verdict=verdict, sampled=sampled)

    def _sample(self, item: Item) -> Sampled:
        t0 = time.perf_counter()
        sampled = sandbox.sample(item.path, self.settings.sample, media_type=item.media_type)
        metrics.DECODE_SECONDS.labels(sampled.media_type).observe(time.perf_counter() - t0)
        return sampled

    def _hashes(
        self, item: Item, sampled: Sampled
    ) -> tuple[list[MediaHash], list[phash.Variant], list[str]]:
        """(hashes, variants, notes): PDQ of each sampled frame (and, for matching only,
        of the frame turned and flipped), and a video's (or animation's) vPDQ, a frame a
        second, hashed in the decoder sandbox under its own time budget.

        A vPDQ that cannot be made (past `matching.vpdq_max_s`, a decoder failure) never
        fails the item: the sampled frames' PDQ still meets the lists of stills, and the
        note says that lists of videos were not searched."""
        hashes, variants = phash.hash_frames(sampled.frames, still=sampled.media_type == "image")
        ms = self.settings.matching
        if not ms.vpdq or sampled.media_type != "video":
            return hashes, variants, []
        budget = self.settings.sample.model_copy(update={"max_decode_s": ms.vpdq_max_s})
        try:
            video = sandbox.vpdq_turned(item.path, budget, max_hashes=ms.vpdq_max_hashes)
        except SynthwatchError as exc:
            log.warning("vPDQ not computed", reason=exc.reason, error=str(exc)[:200])
            return (
                hashes,
                variants,
                [
                    f"vPDQ not computed ({exc}): the sampled frames were matched against "
                    "lists of stills; lists of videos were not searched"
                ],
            )
        hashes.extend(video.hashes)
        variants.extend(video.variants)
        span = sampled.sampled_s or sampled.duration_s
        note = phash.vpdq_note(span, max_hashes=ms.vpdq_max_hashes)
        return hashes, variants, [note] if note else []

    def _provenance(self, item: Item) -> tuple[Provenance | None, Scored]:
        if not self.settings.models.provenance:
            return None, Scored()
        provenance, signals, notes = provenance_signals(item.path, item.mime)
        return provenance, Scored(signals=signals, notes=notes)

    def _faces(self, sampled: Sampled) -> Scored:
        models = self.by_kind("face")
        if not models or not sampled.frames:
            return Scored()
        assert self.faces is not None  # loaded with the first face model
        return score.score_faces(
            sampled,
            self.faces,
            models,
            self.calibration,
            min_confidence=self.settings.models.face_threshold,
        )

    def _images(self, sampled: Sampled) -> Scored:
        models = self.by_kind("image")
        if not models or not sampled.frames or not self._images_apply(sampled):
            return Scored()
        return score.score_images(
            sampled, models, patches_per_frame=self.settings.models.image_patches
        )

    def _images_apply(self, sampled: Sampled) -> bool:
        return sampled.media_type == "image" or self.settings.models.image_on_video

    def _forensics(self, item: Item, sampled: Sampled) -> Scored:
        if not (self.settings.models.forensics and sampled.media_type == "image"):
            return Scored()
        if not sampled.frames:
            return Scored()
        return Scored(signals=forensic_signals(item.path, sampled.frames[0].image))

    def _audio(self, sampled: Sampled) -> Scored:
        if sampled.audio is None:
            return Scored()
        if sampled.media_type != "audio" and not self.settings.models.audio_on_video:
            return Scored(notes=[SOUNDTRACK_NOTE])
        models = self.by_kind("audio")
        if not models:
            if any(kind == "audio" for kind, _why in self.missing.values()):
                return Scored()  # `_missing_notes` says why
            return Scored(notes=[f"audio decoded, but {setting_name('audio')} lists no model"])
        # Windows end where the decoded audio does (max_audio_s may cut it).
        heard = len(sampled.audio) / SAMPLE_RATE
        span = min(sampled.duration_s, heard) if heard else sampled.duration_s
        return score.score_audio(
            sampled.audio, span, models, max_windows=self.settings.models.audio_windows
        )

    def _missing_notes(self, sampled: Sampled) -> list[str]:
        """One note per listed model that was left out (`allow_missing`) and would have
        read this item."""
        ms = self.settings.models
        notes = []
        for name, (kind, why) in self.missing.items():
            applies = (
                bool(sampled.frames)
                if kind == "face"
                else bool(sampled.frames) and self._images_apply(sampled)
                if kind == "image"
                else sampled.audio is not None
                and (sampled.media_type == "audio" or ms.audio_on_video)
            )
            if applies:
                notes.append(f"{name} did not run: {why}")
        return notes


def sampled_context(analysis: Analysis) -> ReportContext:
    """The report's container facts and waveform from the sample `scan` already decoded:
    the audio the detectors heard, not a second decode."""
    sampled = analysis.sampled
    audio = None if sampled.audio is None else AudioTrack(sampled.audio, SAMPLE_RATE)
    return ReportContext(media=media_facts(sampled), audio=audio)


def blob_context(verdict: Verdict, path: Path, settings: SampleSettings) -> ReportContext:
    """The report's container facts and, for an audio item, its waveform, read again
    from the media file: what the decide stage, which receives only the verdict, gives
    the report."""
    media = media_facts(sandbox.probe(path, settings))
    audio = None
    if verdict.media_type == "audio":
        sampled = sandbox.sample(path, settings, media_type="audio")
        audio = None if sampled.audio is None else AudioTrack(sampled.audio, SAMPLE_RATE)
    return ReportContext(media=media, audio=audio)


def sampled_evidence(engine: Engine, analysis: Analysis, path: Path) -> list[EvidenceFrame]:
    """Evidence frames from the frames `scan` already decoded, with their explanations."""
    decoded = [EvidenceFrame(time_s=f.time_s, image=f.image) for f in analysis.sampled.frames]
    return engine.explainer.evidence(analysis.verdict, decoded, path)
