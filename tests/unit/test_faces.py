"""Face crops: MesoNet's 1.3x square framing, black padding at the edges, the detector."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from synthwatch.models.mtcnn import Detection, Net
from synthwatch.operators.faces import FaceDetector, crop_faces, track_faces


def torch_nets(paths: list[Path]) -> tuple[Net, Net, Net]:
    """MTCNN's torch modules loaded from `paths`, as numpy-in, numpy-out functions (the
    scan path gives FaceDetector ONNX Runtime sessions instead)."""
    from synthwatch.models.mtcnn_nets import array_nets, load_mtcnn_nets

    return array_nets(load_mtcnn_nets(paths))


def _frame(height: int = 480, width: int = 640) -> np.ndarray:
    # Every pixel distinct enough that a shifted crop cannot pass for the right one.
    ys, xs = np.mgrid[0:height, 0:width]
    return np.stack([xs % 251, ys % 241, (xs + ys) % 239 + 1], axis=2).astype(np.uint8)


def _det(x0: float, y0: float, x1: float, y1: float, confidence: float = 0.99) -> Detection:
    return Detection(x0, y0, x1, y1, confidence)


def test_crop_is_box_enlarged_1_3x_about_its_centre() -> None:
    frame = _frame()
    (crop,) = crop_faces(frame, [_det(100, 100, 200, 200)], size=130)
    assert crop.box == (100, 100, 200, 200)
    assert crop.crop_box == (85, 85, 215, 215)
    # At size == side the resize is the identity, so the pixels are the frame's.
    np.testing.assert_array_equal(crop.image, frame[85:215, 85:215])


def test_crop_of_a_tall_box_is_square_on_its_long_side() -> None:
    (crop,) = crop_faces(_frame(), [_det(300, 100, 360, 200)])
    x0, y0, x1, y1 = crop.crop_box
    assert x1 - x0 == y1 - y0 == 130
    assert ((x0 + x1) / 2, (y0 + y1) / 2) == (330, 150)


def test_crop_is_resized_to_requested_rgb_size() -> None:
    crops = crop_faces(_frame(), [_det(100, 100, 300, 300), _det(400, 50, 420, 70)], size=256)
    assert [c.image.shape for c in crops] == [(256, 256, 3), (256, 256, 3)]
    assert all(c.image.dtype == np.uint8 for c in crops)


def test_crop_past_the_edge_is_shifted_inside_the_frame_not_padded() -> None:
    frame = _frame()
    (crop,) = crop_faces(frame, [_det(0, 0, 50, 50)], size=65)
    assert crop.crop_box == (0, 0, 65, 65)
    np.testing.assert_array_equal(crop.image, frame[:65, :65])


def test_crop_larger_than_the_frame_shrinks_to_its_shorter_side() -> None:
    frame = _frame(200, 300)
    (crop,) = crop_faces(frame, [_det(20, -10, 280, 190)], size=200)
    x0, y0, x1, y1 = crop.crop_box
    assert (y0, y1) == (0, 200) and x1 - x0 == 200
    np.testing.assert_array_equal(crop.image, frame[:, int(x0) : int(x1)])


def test_crop_skips_low_confidence_and_off_frame_boxes() -> None:
    dets = [_det(10, 10, 60, 60, 0.5), _det(1000, 1000, 1100, 1100), _det(10, 10, 60, 60, 0.95)]
    crops = crop_faces(_frame(), dets)
    assert [c.confidence for c in crops] == [0.95]


def test_crops_reject_non_rgb_frames() -> None:
    with pytest.raises(ValueError):
        crop_faces(np.zeros((32, 32), dtype=np.uint8), [])
    with pytest.raises(ValueError):
        crop_faces(np.zeros((32, 32, 3), dtype=np.float32), [])


def test_detector_needs_no_torch_and_rejects_a_minimum_face_under_12_pixels() -> None:
    import subprocess
    import sys

    # The scan path's detector module must not pull in torch (the nets come as array
    # functions); a fresh interpreter, as this one has torch loaded by other tests.
    code = "import sys, synthwatch.operators.faces; sys.exit('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], check=False).returncode == 0

    def net(batch: np.ndarray) -> tuple[np.ndarray, ...]:
        raise AssertionError("not called")

    with pytest.raises(ValueError):
        FaceDetector((net, net, net), min_size=8)


@pytest.mark.shared
def test_detector_and_crops_on_the_multiface_clip(shared_dir: Path) -> None:
    import av

    root = shared_dir / "weights" / "mtcnn"
    nets = torch_nets([root / "pnet.pt", root / "rnet.pt", root / "onet.pt"])
    detector = FaceDetector(nets, min_size=40, threshold=0.9)
    with av.open(str(shared_dir / "media/dev/real/facenet_multiface.mp4")) as container:
        frame = np.asarray(next(container.decode(video=0)).to_ndarray(format="rgb24"), np.uint8)
    (detections,) = detector.detect([frame])
    assert all(d.confidence >= 0.9 for d in detections)
    crops = crop_faces(frame, detections)
    assert len(crops) >= 5  # observed 6
    assert all(c.image.shape == (256, 256, 3) for c in crops)


def test_cascade_fallback_finds_the_astronauts_face_and_nothing_in_a_blank_frame() -> None:
    from skimage import data

    from synthwatch.operators.faces import CascadeFaceDetector

    astronaut = np.ascontiguousarray(data.astronaut())  # 512x512, one face near (220, 110)
    big = np.repeat(np.repeat(astronaut, 2, axis=0), 2, axis=1)  # scanned at reduced size
    blank = np.full((480, 640, 3), 128, dtype=np.uint8)
    found, found_big, none = CascadeFaceDetector().detect([astronaut, big, blank])
    assert none == []
    for dets, k in ((found, 1), (found_big, 2)):
        assert len(dets) >= 1
        d = dets[0]
        cx, cy = (d.x0 + d.x1) / 2 / k, (d.y0 + d.y1) / 2 / k
        assert 170 < cx < 270 and 60 < cy < 160, (cx, cy)
        crops = crop_faces(astronaut if k == 1 else big, dets[:1], size=128)
        assert crops[0].image.shape == (128, 128, 3)


def test_cascade_fallback_reports_only_boxes_scikit_image_finds_with_the_same_cascade() -> None:
    # The fallback runs scikit-image's copy of OpenCV's LBP cascade in OpenCV, for speed.
    # Every face it reports must be one the reference implementation reports; OpenCV
    # merges overlapping windows more firmly, so on the astronaut it reports her face
    # once where scikit-image reports it twice plus two windows on the suit.
    from skimage import data
    from skimage.color import rgb2gray
    from skimage.feature import Cascade

    from synthwatch.operators.faces import CascadeFaceDetector

    astronaut = np.ascontiguousarray(data.astronaut())
    reference = Cascade(data.lbp_frontal_face_cascade_filename()).detect_multi_scale(
        rgb2gray(astronaut),
        scale_factor=1.2,
        step_ratio=1,
        min_size=(40, 40),
        max_size=(512, 512),
        min_neighbor_number=4,
    )
    (found,) = CascadeFaceDetector(min_size=40).detect([astronaut])
    assert len(found) == 1
    for det in found:
        cx, cy, side = (det.x0 + det.x1) / 2, (det.y0 + det.y1) / 2, det.x1 - det.x0
        assert 170 < cx < 270 and 60 < cy < 160  # her face
        assert any(
            abs(ref["c"] + ref["width"] / 2 - cx) < 0.15 * side
            and abs(ref["r"] + ref["height"] / 2 - cy) < 0.15 * side
            and 0.8 < side / ref["width"] < 1.25
            for ref in reference
        )


def test_cascade_fallback_can_be_called_from_several_threads_at_once() -> None:
    # The engine shares one detector between its worker threads; OpenCV's classifier
    # keeps per-call state, so sharing one across threads failed an assertion.
    from concurrent.futures import ThreadPoolExecutor

    from skimage import data

    from synthwatch.operators.faces import CascadeFaceDetector

    astronaut = np.ascontiguousarray(data.astronaut())
    frames = [astronaut, np.ascontiguousarray(astronaut[:, ::-1]), astronaut[64:, 32:].copy()]
    detector = CascadeFaceDetector()
    expected = [detector.detect([f]) for f in frames]
    with ThreadPoolExecutor(max_workers=4) as pool:
        results = list(pool.map(lambda i: detector.detect([frames[i % 3]]), range(240)))
    for i, got in enumerate(results):
        assert got == expected[i % 3]


def _box(cx: float, cy: float, size: float) -> tuple[float, float, float, float]:
    return (cx - size / 2, cy - size / 2, cx + size / 2, cy + size / 2)


def test_a_panel_of_three_seen_in_sixteen_frames_is_three_faces() -> None:
    rng = np.random.default_rng(0)
    seats = [(100.0, 120.0, 60.0), (300.0, 110.0, 70.0), (500.0, 130.0, 55.0)]
    frames = []
    for _ in range(16):
        boxes = [_box(x + rng.normal(0, 6), y + rng.normal(0, 6), s) for x, y, s in seats]
        rng.shuffle(boxes)  # detectors list faces by confidence, not by seat
        frames.append(boxes)
    frames[5] = frames[5][:2]  # one face missed in one frame
    ids = track_faces(frames)
    assert len({i for f in ids for i in f}) == 3
    assert sum(map(len, ids)) == 47  # the detections, which the old figure counted


def test_a_face_walking_across_the_frame_is_one_face() -> None:
    # 0.8 face sizes a sampled frame, steadily: beyond a fixed radius from the last
    # sighting after a missed frame, but where its velocity says it will be.
    frames = [[_box(100 + 80 * i, 200, 100)] for i in range(10)]
    frames[4] = []
    ids = track_faces(frames)
    assert len({i for f in ids for i in f}) == 1


def test_two_faces_in_one_frame_are_never_one_face_and_sizes_must_agree() -> None:
    close = [[_box(100, 100, 50), _box(140, 100, 50)]] * 3
    assert {tuple(f) for f in track_faces(close)} == {(0, 1)}
    # A face in the background where a close-up was: a different person.
    far = [[_box(200, 200, 200)], [_box(200, 200, 60)]]
    assert track_faces(far) == [[0], [1]]
