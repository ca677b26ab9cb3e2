"""Video I/O (PyAV) and the docs/algorithm.md §12 buckets, resize and padding."""

import numpy as np
import pytest
from PIL import Image

from trigflow_distill.common import video


def _frames(t, h, w, seed=0):
    rng = np.random.default_rng(seed)
    smooth = np.linspace(0, 255, w)[None, None, :, None] * np.ones((t, h, 1, 3))
    return np.clip(smooth + rng.normal(0, 4, (t, h, w, 3)), 0, 255).astype(np.uint8)


def test_write_read_round_trip(tmp_path):
    frames = _frames(6, 32, 48)
    video.write_mp4(tmp_path / "a.mp4", frames, 24)
    back, fps = video.read_video(tmp_path / "a.mp4")
    assert back.shape == frames.shape and back.dtype == np.uint8 and fps == 24
    assert np.abs(back.astype(np.int16) - frames).mean() < 4  # lossy, but close


def test_bad_files_are_clear_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="no such video file"):
        video.read_video(tmp_path / "missing.mp4")
    (tmp_path / "corrupt.mp4").write_bytes(b"\x00\x00\x00\x18ftypmp42" + b"garbage" * 50)
    with pytest.raises(ValueError, match="corrupt.mp4: cannot read the video"):
        video.read_video(tmp_path / "corrupt.mp4")
    with pytest.raises(ValueError, match="must be even"):
        video.write_mp4(tmp_path / "odd.mp4", np.zeros((2, 31, 48, 3), np.uint8), 16)
    with pytest.raises(ValueError, match="uint8"):
        video.write_mp4(tmp_path / "f.mp4", np.zeros((2, 32, 48, 3), np.float32), 16)


def test_bucket_tables_and_choice():
    assert video.buckets("720") == {
        "1:1": (960, 960),
        "4:3": (960, 704),
        "3:4": (704, 960),
        "16:9": (1280, 704),
        "9:16": (704, 1280),
    }
    assert video.buckets("480")["16:9"] == (768, 432) and video.buckets("256")["9:16"] == (192, 320)
    assert video.choose_bucket(1920, 1080, "720") == (1280, 704)
    assert video.choose_bucket(1080, 1920, "720") == (704, 1280)
    assert video.choose_bucket(640, 480, "480") == (640, 480)
    assert video.choose_bucket(500, 520, "256") == (256, 256)
    assert video.choose_bucket(1000, 600, "256") == (320, 192)  # 1.67: nearer 16:9 than 4:3
    with pytest.raises(ValueError, match="unknown resolution '1080'"):
        video.buckets("1080")


def test_resize_and_reflection_padding():
    frames = _frames(3, 48, 70)  # aspect 1.46 -> 4:3 bucket 320x256; r = min(320/70, 256/48) = 4.571
    vid, mask = video.resize_and_pad(frames, (320, 256))
    assert vid.shape == (3, 3, 256, 320) and vid.dtype == np.float32 and mask.shape == (1, 256, 320)
    nh, nw = int(48 * 320 / 70 + 0.5), 320  # 219 x 320, pads 18 above, 19 below
    top = (256 - nh) // 2
    assert (top, 256 - nh - top) == (18, 19)
    assert mask[0, :top].all() and mask[0, top + nh :].all() and not mask[0, top : top + nh].any()
    resized = np.asarray(Image.fromarray(frames[1]).resize((nw, nh), Image.BICUBIC))
    np.testing.assert_allclose(vid[:, 1, top : top + nh].transpose(1, 2, 0), resized / 127.5 - 1, atol=1e-6)
    # reflection about the first and last content rows
    np.testing.assert_array_equal(vid[:, :, top - 5], vid[:, :, top + 5])
    np.testing.assert_array_equal(vid[:, :, top + nh - 1 + 7], vid[:, :, top + nh - 1 - 7])
    assert vid.min() >= -1 and vid.max() <= 1


def test_edge_padding_when_pad_exceeds_frame_and_uint8_round_trip():
    strip = _frames(2, 4, 64)  # 4x64 -> 16x256 in a 256x256 bucket: pads of 120 rows > 16 -> edge padding
    vid, mask = video.resize_and_pad(strip, (256, 256))
    assert mask.sum() == 256 * 240
    np.testing.assert_array_equal(vid[:, :, 0], vid[:, :, 120])
    np.testing.assert_array_equal(vid[:, :, 255], vid[:, :, 135])
    frames = _frames(2, 32, 48)
    same, mask = video.resize_and_pad(frames, (48, 32))  # already the bucket size: no resampling, no padding
    assert not mask.any()
    np.testing.assert_array_equal(video.to_uint8(same), frames)
    clamped = video.to_uint8(np.array([-3.0, -1.0, 0.0, 1.0, 2.0]).reshape(1, 1, 1, 5).repeat(3, 0))
    assert clamped[0, 0, :, 0].tolist() == [0, 0, 128, 255, 255]


def test_empty_video_file_names_the_file_and_the_cause(tmp_path):
    """FFmpeg's answer to a 0-byte file is "[Errno 22] Invalid argument" (an OSError, no file name)."""
    empty = tmp_path / "empty.mp4"
    empty.write_bytes(b"")
    with pytest.raises(ValueError, match=r"empty\.mp4: empty file \(0 bytes\)") as e:
        video.read_video(empty)
    assert "\n" not in str(e.value)
