import json
import random

import pytest

from fastgfn.trainer.replay import ReplayBuffer, edit_distance


def test_edit_distance():
    assert edit_distance([1, 2, 3], [1, 2, 3]) == 0
    assert edit_distance([1, 2, 3], [1, 3]) == 1
    assert edit_distance([], [4, 5]) == 2
    assert edit_distance([1, 2, 3, 4], [5, 6, 7, 8], cap=1) == 2


def test_top_k_distinct():
    buf = ReplayBuffer(3)
    assert buf.add(0, [1], -5.0)
    assert not buf.add(0, [1], -5.0)  # exact duplicate
    buf.add(0, [2], -1.0)
    buf.add(0, [3], -3.0)
    assert not buf.add(0, [4], -9.0)  # worse than the worst, buffer full
    assert buf.add(0, [5], 0.0)  # evicts [1]
    assert sorted(s for _, s in buf.entries[0]) == [[2], [3], [5]]
    assert buf.size(1) == 0


def test_near_duplicates_replaced_only_by_better():
    buf = ReplayBuffer(10, min_distance=1)
    buf.add(0, [1, 2, 3], -2.0)
    assert not buf.add(0, [1, 2, 4], -3.0)
    assert buf.add(0, [1, 2, 4], -1.0)
    assert [s for _, s in buf.entries[0]] == [[1, 2, 4]]
    assert buf.add(0, [7, 8, 9], -5.0)
    assert len(buf) == 2


def test_sample_and_tensors():
    buf = ReplayBuffer(5)
    buf.add_batch(2, [[1, 2], [3]], [0.0, -1.0])
    rows = buf.sample(2, 6, random.Random(0))
    assert len(rows) == 6 and all(r in ([1, 2], [3]) for r in rows)
    tokens, lengths = ReplayBuffer.to_tensors([[1, 2], [3]], pad_token_id=9)
    assert tokens.tolist() == [[1, 2], [3, 9]] and lengths.tolist() == [2, 1]
    with pytest.raises(ValueError, match="nothing"):
        buf.sample(0, 1, random.Random(0))


def test_json_round_trip():
    buf = ReplayBuffer(4, min_distance=0)
    buf.add_batch(0, [[1], [2, 3]], [-1.0, -0.5])
    buf.add(7, [4, 4], 0.25)
    state = json.loads(json.dumps(buf.state_dict()))
    other = ReplayBuffer(1)
    other.load_state_dict(state)
    assert other.entries == buf.entries and other.capacity == 4


def test_relative_near_duplicates():
    """relative_distance (the paper's 0.25): near when the edit distance is below that
    fraction of the summed lengths; a better near-duplicate replaces the stored one."""
    buf = ReplayBuffer(capacity=5, relative_distance=0.25)
    assert buf.add(0, [1, 2, 3, 4], -3.0)
    # 1 edit < 0.25 * (4 + 4) = 2: a near-duplicate, worse, refused
    assert not buf.add(0, [1, 2, 3, 5], -4.0)
    # 2 edits are not < 2: distinct, stored
    assert buf.add(0, [1, 2, 6, 7], -5.0)
    # better near-duplicate of the first replaces it
    assert buf.add(0, [1, 2, 3, 9], -1.0)
    assert sorted(seq for _, seq in buf.entries[0]) == [[1, 2, 3, 9], [1, 2, 6, 7]]
    state = buf.state_dict()
    again = ReplayBuffer(capacity=1)
    again.load_state_dict(state)
    assert again.relative_distance == 0.25 and again.entries == buf.entries
    with pytest.raises(ValueError, match="relative_distance"):
        ReplayBuffer(capacity=5, relative_distance=1.5)
