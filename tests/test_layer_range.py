import pytest

from shards import LayerRange, RangeError, split_even

pytestmark = pytest.mark.unit


def test_half_open_and_contains():
    r = LayerRange(3, 7)
    assert len(r) == 4 and list(r) == [3, 4, 5, 6]
    assert 3 in r and 6 in r and 7 not in r and 2 not in r
    assert str(r) == "[3, 7)"
    assert r.is_first() is False and LayerRange(0, 2).is_first()
    assert r.is_last(7) and not r.is_last(8)


@pytest.mark.parametrize("start,end", [(2, 2), (5, 3), (-1, 2)])
def test_empty_or_negative_refused(start, end):
    with pytest.raises(RangeError, match=rf"\[{start}, {end}\)"):
        LayerRange(start, end)


def test_outside_model_refused():
    with pytest.raises(RangeError, match=r"\[28, 31\) lies outside \[0, 30\)"):
        LayerRange(28, 31).check_within(30)
    assert LayerRange(28, 30).check_within(30) == LayerRange(28, 30)


def test_split_even_covers_once():
    for n in range(1, 40):
        for k in range(1, n + 1):
            rs = split_even(n, k)
            assert [x for r in rs for x in r] == list(range(n))
            assert max(map(len, rs)) - min(map(len, rs)) <= 1


def test_split_even_bad_counts():
    with pytest.raises(RangeError, match="at least one shard"):
        split_even(30, 0)
    with pytest.raises(RangeError, match="31 shards for 30 layers"):
        split_even(30, 31)
