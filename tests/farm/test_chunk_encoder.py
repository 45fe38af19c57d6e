"""How a segment's streamed frames become H.264 chunks (farm/tasks/segment_runner.py)."""

from types import SimpleNamespace

import numpy as np
import pytest

from farm.settings import Settings
from farm.storage import Storage
from farm.tasks.segment_runner import ChunkEncoder
from workers.video import probe


def stream(frames: int) -> list[int]:
    """Frames per decoded latent frame, as Wan's causal decoder yields them: 1, then 4s."""
    return [1] + [4] * ((frames - 1) // 4)


@pytest.mark.parametrize("frames, skip, chunks", [
    (17, 0, [17]),                  # 16 + 1 before the tail rule: two ffmpeg runs
    (81, 0, [16, 16, 16, 16, 17]),  # Wan's default length
    (33, 8, [16, 9]),               # a continuing segment drops what the last one showed
    (41, 0, [16, 16, 9]),           # 9 frames wait: more than the tail, a chunk of their own
])
def test_a_short_remainder_joins_the_last_chunk(tmp_path, frames, skip, chunks):
    settings = Settings(encode_chunk_frames=16, work_dir=tmp_path / "work")
    job = SimpleNamespace(id="j1", width=64, height=64, fps=8)
    segment = SimpleNamespace(index=0, attempts=1, skip_frames=skip)
    storage = Storage(f"file://{tmp_path / 'store'}")
    encoder = ChunkEncoder(job, segment, settings, storage, tmp_path)
    rng = np.random.default_rng(0)
    for count in stream(frames):
        encoder.add(rng.integers(0, 255, (count, 16, 16, 3), dtype=np.uint8))
    keys = encoder.finish()
    counted = [probe(storage.get_file(key, tmp_path / f"{i}.mp4")).frames
               for i, key in enumerate(keys)]
    assert counted == chunks
    assert sum(counted) == frames - skip
    assert encoder.last_frame is not None
