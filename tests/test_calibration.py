"""Calibration data (pure, no model): a user's file read at the asked offset and size, the
evaluation windows held out of it, and SparseGPT's dampening falling with the tokens."""
import json

import pytest

from shards.compress.calibration import CalibrationData, calibration_ids, held_out
from shards.compress.sparsegpt import damp_for

pytestmark = pytest.mark.unit


class CharTokenizer:
    """One token per character, so offsets are checkable by eye."""

    def __call__(self, text, add_special_tokens=False):
        return {"input_ids": [ord(c) for c in text]}


def test_text_file_rows_at_offset(tmp_path):
    path = tmp_path / "domain.txt"
    path.write_text("abcdefghij" * 100)          # 1,000 tokens
    ids = calibration_ids(CharTokenizer(), CalibrationData(str(path), tokens=512, skip=3))
    assert ids.shape == (2, 256)                  # rows of 256
    assert ids[0, :3].tolist() == [ord("d"), ord("e"), ord("f")]
    assert ids.flatten().tolist() == [ord(c) for c in ("abcdefghij" * 100)[3:515]]


def test_jsonl_prompt_or_text_fields(tmp_path):
    path = tmp_path / "chats.jsonl"
    rows = [{"prompt": "x" * 200}, {"text": "y" * 200}, {"other": 1}]
    path.write_text("\n".join(json.dumps(r) for r in rows))
    ids = calibration_ids(CharTokenizer(), CalibrationData(str(path), tokens=256)).flatten().tolist()
    assert ids[:200] == [ord("x")] * 200 and ids[200:202] == [ord("\n")] * 2 and ids[202:] == [ord("y")] * 54


def test_too_short_file_names_the_numbers(tmp_path):
    path = tmp_path / "short.txt"
    path.write_text("z" * 300)
    with pytest.raises(ValueError, match="holds 300 tokens, 200 after skipping 100; calibration needs 512"):
        calibration_ids(CharTokenizer(), CalibrationData(str(path), tokens=512, skip=100))


def test_eval_text_is_held_out(tmp_path):
    text = tmp_path / "wiki.txt"
    text.write_text("t")
    other = tmp_path / "mine.txt"
    other.write_text("t")
    same = held_out(CalibrationData(str(tmp_path / "." / "wiki.txt")), text, 4096)
    assert same.skip == 4096
    assert held_out(CalibrationData(str(other)), text, 4096).skip == 0
    assert held_out(CalibrationData(), text, 4096) == CalibrationData()
    with pytest.raises(ValueError, match="every window of it is evaluated"):
        held_out(CalibrationData(str(text)), text, None)


def test_default_is_the_prompts_shape():
    assert CalibrationData().shape(gptq=False) == (32, 128)
    assert CalibrationData().shape(gptq=True) == (77, 128)
    assert CalibrationData("f.txt").shape(gptq=False) == (256, 256)
    assert CalibrationData("f.txt").shape(gptq=True) == (64, 256)


def test_sparsegpt_damping_falls_with_tokens():
    assert damp_for(4096) == pytest.approx(0.3) and damp_for(1000) == pytest.approx(0.3)
    assert damp_for(16384) == pytest.approx(0.075) and damp_for(10**7) == pytest.approx(0.01)
    assert damp_for(65536) < damp_for(16384) < damp_for(4096)
