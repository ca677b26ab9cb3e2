"""prepare's clip sampling (docs/algorithm.md §12) against an independent re-implementation of NVIDIA's
Video2World rule, on tiny synthetic videos whose frames carry their index as a barcode; caption windows in the
JSONL; the fps filter; fixed strides. No encoders: decoding and planning only."""

import json
import os
from fractions import Fraction

import av
import numpy as np
import pytest

from trigflow_distill.common import video
from trigflow_distill.prepare import clips

BITS = 10  # frame index barcode: 10 bars of 3 pixels, black or white
CLIP = 9  # --frames of the parity tests (the rule is the same with 93)


def _barcode_frames(n):
    """(n, 32, 32, 3) uint8 frames, frame i showing i in binary as vertical bars (survive H.264 at crf 18)."""
    bits = (np.arange(n)[:, None] >> np.arange(BITS)[None]) & 1  # (n, BITS)
    cols = np.repeat(bits, 3, axis=1) * 255  # (n, 30)
    frames = np.zeros((n, 32, 32, 3), np.uint8)
    frames[:, :, :30] = cols[:, None, :, None]
    return frames


def _read_barcode(frames_thw3):
    bars = frames_thw3[:, 8:24, :30, 0].astype(np.float32).mean(1).reshape(len(frames_thw3), BITS, 3).mean(-1)
    return ((bars > 127) * (1 << np.arange(BITS))).sum(-1).tolist()


def _write_mkv(path, frames, fps):
    """Matroska from PyAV states no frame count (stream.frames == 0)."""
    with av.open(str(path), mode="w", format="matroska") as container:
        stream = container.add_stream("libx264", rate=Fraction(fps))
        stream.width, stream.height, stream.pix_fmt = 32, 32, "yuv420p"
        stream.options = {"crf": "18"}
        for f in frames:
            frame = av.VideoFrame.from_ndarray(f, format="rgb24")
            frame.pts = None
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)


def _reference_indices(windows_frames, fps, num_frames):
    """Straight from the reference's rule, written apart from the library: {window index: [frame indices]}."""
    if fps < 10 or fps > 60:
        return None
    if len(windows_frames) > 1:
        windows_frames = windows_frames[:-1]
    picked = {}
    for k, (start, end) in enumerate(windows_frames):
        end = min(end, num_frames)
        length = end - start
        if length < 4 * fps or length < CLIP:
            continue
        step = max(1, length // CLIP)
        lo = start + (length - CLIP * step) // 2
        picked[k] = [lo + j * step for j in range(CLIP)]
    return picked


CASES = [
    # (fps, video frames, windows as JSONL fields, note)
    (24, 130, [{}], "whole video, stride 14, leftover 4"),
    (30, 400, [{"start": 0, "end": 5}, {"start": 5, "end": 7}, {"start": 7, "end": 13}], "2 s window too short"),
    (60, 600, [{"start_frame": 10, "end_frame": 261}, {"start_frame": 260}], "last dropped, odd leftover 7"),
    (30, 300, [{"start_frame": 0, "end_frame": 150}, {"start_frame": 149, "end_frame": 290}], "stride 16"),
    (24, 200, [{"start": 0.5}], "to the end"),
    (60, 300, [{}, {"start_frame": 0, "end_frame": 240}, {}], "three windows, whole-video ones"),
]


@pytest.mark.parametrize("fps,n,fields,note", CASES, ids=[c[3] for c in CASES])
def test_clips_match_an_independent_reimplementation(tmp_path, fps, n, fields, note):
    path = tmp_path / "v.mp4"
    frames = _barcode_frames(n)
    video.write_mp4(path, frames, fps)
    lines = [json.dumps({"video": "v.mp4", "caption": f"window {k}", **f}) for k, f in enumerate(fields)]
    (tmp_path / "c.jsonl").write_text("\n".join(lines) + "\n")
    windows = clips.read_captions(str(tmp_path / "c.jsonl"))["v.mp4"]
    decoded, skipped, got_fps, _ = clips.read_clip_frames(str(path), windows, CLIP)
    assert got_fps == fps
    in_frames = [
        (round(f.get("start", 0) * fps), n if "end" not in f else round(f["end"] * fps))
        if "start_frame" not in f
        else (f["start_frame"], f.get("end_frame", n))
        for f in fields
    ]
    want = _reference_indices(in_frames, fps, n)
    assert {plan.window: list(plan.indices) for plan, _ in decoded} == want
    for plan, clip in decoded:  # the frames decoded are the ones named
        assert _read_barcode(clip) == list(plan.indices)
        assert plan.window_frames == (in_frames[plan.window][0], min(in_frames[plan.window][1], n))
    assert sorted(s["window"] for s in skipped) == sorted(set(range(len(fields))) - set(want))


def test_reference_rule_at_93_frames():
    """The release's clip: 93 frames, the stride and the centring of the span (pure function)."""
    assert clips.clip_ranges(0, 300, 93) == [range(10, 289, 3)]  # 300 // 93 = 3, span 279, leftover 21 -> 10
    assert clips.clip_ranges(50, 143, 93) == [range(50, 143, 1)]  # exactly 93 frames
    assert clips.clip_ranges(0, 92, 93) == []
    assert clips.clip_ranges(120, 720, 93) == [range(141, 699, 6)]  # 600 // 93 = 6, span 558, leftover 42
    plans, skipped = clips.plan_clips(
        [clips.Window("a", 0, 10), clips.Window("b", 10, 13), clips.Window("c", 13, None)], 900, 30.0, 93, "auto", 1
    )
    assert [(p.window, p.window_frames, p.indices) for p in plans] == [(0, (0, 300), range(10, 289, 3))]
    assert [s["window"] for s in skipped] == [1, 2]
    assert "too short" in skipped[0]["reason"] and "dropped" in skipped[1]["reason"]


def test_several_clips_per_window_only_with_room():
    # 100 // 9 = 11, span 99, leftover 1: starts 0 and 1 (the middle one rounds onto one of them)
    assert clips.clip_ranges(0, 100, 9, "auto", 3) == [range(0, 99, 11), range(1, 100, 11)]
    assert clips.clip_ranges(0, 99, 9, "auto", 3) == [range(0, 99, 11)]  # no room: one clip
    assert clips.clip_ranges(0, 200, 93, 1, 3) == [range(0, 93), range(54, 147), range(107, 200)]  # today's rule


def test_fps_outside_the_reference_range_is_skipped(tmp_path):
    for fps in (5, 120):
        path = tmp_path / f"v{fps}.mp4"
        video.write_mp4(path, _barcode_frames(20), fps)
        item = clips.Item(str(path), path.name, (clips.Window("x"),))
        with pytest.raises(ValueError, match=rf"fps {fps} outside \[10, 60\]"):
            clips.load_clips(item, "256", 5, 1)
        # a fixed stride takes any fps
        got, _ = clips.load_clips(item, "256", 5, 1, stride=2)
        assert [c.plan.indices for c in got] == [range(5, 15, 2)]


def test_frame_stride_1_gives_consecutive_frames(tmp_path):
    path = tmp_path / "v.mp4"
    video.write_mp4(path, _barcode_frames(9), 8.0)  # 8 fps, 9 frames: outside what "auto" takes
    decoded, skipped, fps, _ = clips.read_clip_frames(str(path), [clips.Window("x")], 5, 1, 2)
    assert [_read_barcode(f) for _, f in decoded] == [[0, 1, 2, 3, 4], [4, 5, 6, 7, 8]] and skipped == []
    decoded, _, _, _ = clips.read_clip_frames(str(path), [clips.Window("x")], 5, 1, 1)
    assert _read_barcode(decoded[0][1]) == [2, 3, 4, 5, 6]  # one clip: centred, like the reference
    with pytest.raises(ValueError, match="too short"):
        clips.read_clip_frames(str(path), [clips.Window("x")], 5, 2, 1)  # 5 x 2 > 9 frames


def test_decodes_only_as_far_as_needed_and_without_a_stated_count(tmp_path):
    frames = _barcode_frames(240)
    for name in ("v.mp4", "v.mkv"):
        path = tmp_path / name
        video.write_mp4(path, frames, 24) if name.endswith("mp4") else _write_mkv(path, frames, 24)
        with av.open(str(path)) as c:
            assert bool(c.streams.video[0].frames) == name.endswith("mp4")
        window = [clips.Window("first 5 s", 0, 5), clips.Window("rest", 5, None)]
        decoded, _, _, n = clips.read_clip_frames(str(path), window, 9)
        assert [p.indices for p, _ in decoded] == [range(1, 118, 13)]  # 120 // 9 = 13, span 117, leftover 3
        assert n == 106 < 240  # decoding stops after frame 105: the tail is not decoded
        whole = clips.read_clip_frames(str(path), [clips.Window("all")], 9)[0]
        assert _read_barcode(whole[0][1]) == list(range(3, 237, 26))  # 240 // 9 = 26, span 234, leftover 6 -> 3


def test_captions_jsonl_windows(tmp_path):
    path = tmp_path / "c.jsonl"
    path.write_text(
        "\n".join(
            json.dumps(x)
            for x in [
                {"video": "a.mp4", "caption": "whole"},
                {"video": "b.mp4", "caption": "first", "start": 0, "end": 4.5},
                {"video": "b.mp4", "caption": "second", "start": 4.5},
                {"video": "b.mp4", "caption": "frames", "start_frame": 10, "end_frame": 200},
            ]
        )
    )
    got = clips.read_captions(str(path))
    assert got["a.mp4"] == [clips.Window("whole")]
    assert [w.caption for w in got["b.mp4"]] == ["first", "second", "frames"]  # file order
    assert [w.to_frames(30.0, 1000) for w in got["b.mp4"]] == [(0, 135), (135, 1000), (10, 200)]
    assert got["a.mp4"][0].to_frames(29.97, 321) == (0, 321)
    assert clips.Window("x", 1.0, 2.0).to_frames(23.976, 100) == (24, 48)  # seconds round to the nearest frame
    for bad, msg in [
        ({"video": "a", "caption": "x", "start": 3, "end": 2}, "ends"),
        ({"video": "a", "caption": "x", "start": 1, "start_frame": 2}, "not both"),
        ({"video": "a", "caption": "x", "start_frame": 1.5}, "whole number"),
        ({"video": "a", "caption": "x", "end": -1}, "seconds"),
    ]:
        path.write_text(json.dumps(bad) + "\n")
        with pytest.raises(ValueError, match=rf"line 1: .*{msg}"):
            clips.read_captions(str(path))


def test_sidecar_is_one_whole_video_window(tmp_path):
    (tmp_path / "a.txt").write_text("sidecar caption\n")
    items = clips.make_items([str(tmp_path / "a.mp4"), str(tmp_path / "b.mp4")], str(tmp_path), {})
    assert items[0].windows == (clips.Window("sidecar caption"),) and items[1].windows == ()


def test_blank_captions_are_skipped_and_reported(tmp_path):
    """An empty or blank caption would train its clips without text: its window is skipped with the reason (the
    video's other windows are kept, the window indices and the last-window rule unchanged)."""
    windows = [clips.Window("a car", 0, 60), clips.Window("  \t", 60, 120), clips.Window("", 120, 180)]
    windows.append(clips.Window("the end", 180))
    plans, skipped = clips.plan_clips(windows, 240, 30.0, 9, 1, 1)
    assert [p.window for p in plans] == [0]
    assert [(s["window"], s["reason"]) for s in skipped][:2] == [(1, "empty caption"), (2, "empty caption")]
    with pytest.raises(ValueError, match="^empty caption$"):
        clips.plan_clips([clips.Window(" ")], 240, 30.0, 9, 1, 1)
    (tmp_path / "a.txt").write_text("\n \n")  # a blank sidecar is a blank caption too
    item = clips.make_items([str(tmp_path / "a.mp4")], str(tmp_path), {})[0]
    _write_mkv(tmp_path / "a.mp4", _barcode_frames(40), 30)
    with pytest.raises(ValueError, match="empty caption"):
        clips.load_clips(item, "256", 9, 1, 1)


def test_links_out_of_the_videos_folder_are_refused_unless_follow_links(tmp_path):
    videos, elsewhere = tmp_path / "videos", tmp_path / "elsewhere"
    videos.mkdir()
    elsewhere.mkdir()
    _write_mkv(elsewhere / "x.mkv", _barcode_frames(12), 30)
    _write_mkv(videos / "y.mkv", _barcode_frames(12), 30)
    _write_mkv(videos / "z.mkv", _barcode_frames(12), 30)
    (elsewhere / "secret.txt").write_text("a caption from outside")
    (videos / "x.mkv").symlink_to(elsewhere / "x.mkv")
    (videos / "y.txt").symlink_to(elsewhere / "secret.txt")
    (videos / "inside.txt").write_text("kept")
    (videos / "z.txt").symlink_to(videos / "inside.txt")  # a link that stays inside is fine
    listed, root = clips.list_videos(str(videos))
    captions = {"x.mkv": [clips.Window("listed")]}
    items = {os.path.basename(it.path): it for it in clips.make_items(listed, root, captions, confine=True)}
    assert items["x.mkv"].refused.startswith("refused: links to ")
    assert str(elsewhere / "x.mkv") in items["x.mkv"].refused and "--follow-links" in items["x.mkv"].refused
    assert "sidecar caption" in items["y.mkv"].refused and items["y.mkv"].windows == ()
    assert items["z.mkv"].refused is None and items["z.mkv"].windows == (clips.Window("kept"),)
    for name in ("x.mkv", "y.mkv"):
        with pytest.raises(ValueError, match="outside --videos"):
            clips.load_clips(items[name], "256", 9, 1, 1)
    followed = {os.path.basename(it.path): it for it in clips.make_items(listed, root, captions, confine=False)}
    assert followed["x.mkv"].refused is None and followed["y.mkv"].windows == (clips.Window("a caption from outside"),)


def test_non_utf8_caption_files_name_the_file_and_line(tmp_path):
    captions = tmp_path / "c.jsonl"
    captions.write_bytes(b'{"video": "a.mp4", "caption": "fine"}\n{"video": "b.mp4", "caption": "caf\xe9"}\n')
    with pytest.raises(ValueError, match=rf"^--captions {captions} line 2: not UTF-8 text \(byte 0xe9 at column"):
        clips.read_captions(str(captions))
    listing = tmp_path / "list.txt"
    listing.write_bytes(b"a.mp4\n\xff.mp4\n")
    with pytest.raises(ValueError, match=r"--videos .*list.txt line 2: not UTF-8"):
        clips.list_videos(str(listing))
    (tmp_path / "s.txt").write_bytes(b"ok\n\x80bad\n")
    item = clips.make_items([str(tmp_path / "s.mp4")], str(tmp_path), {})[0]
    assert item.refused.startswith(f"sidecar caption {tmp_path / 's.txt'} line 2: not UTF-8")
    # a UTF-8 byte-order mark is not part of the first line
    captions.write_bytes(b'\xef\xbb\xbf{"video": "a.mp4", "caption": "caf\xc3\xa9"}\n')
    assert clips.read_captions(str(captions))["a.mp4"] == [clips.Window("café")]


def test_empty_video_file_is_reported_as_empty(tmp_path):
    empty = tmp_path / "empty.mp4"
    empty.write_bytes(b"")
    with pytest.raises(ValueError, match=r"^empty file \(0 bytes\), not a video$"):
        clips.read_clip_frames(str(empty), [clips.Window("a cat")], frames=5)
