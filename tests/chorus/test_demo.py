"""`chorus demo` on the built-in model: the table names each request's outcome and source, the contact sheet has a
row per request and a column per frame."""

from __future__ import annotations

import pytest
import torch
from PIL import Image

from chorus.cli import main
from chorus.demo import SEQUENCE


@pytest.fixture(autouse=True)
def restore_threads():  # the demo runs torch on one thread; the tests after it in this process keep theirs
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


def test_demo_prints_what_each_request_reused_and_writes_one_contact_sheet(tmp_path, capsys):
    out = tmp_path / "sheet" / "demo.png"
    assert main(["demo", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    rows = [line for line in printed.splitlines() if line.startswith("| ") and not line.startswith("| #")]
    assert len(rows) == len(SEQUENCE)
    cells = [[c.strip() for c in row.strip("|").split("|")] for row in rows]
    assert [c[1] for c in cells] == [kind for kind, _, _ in SEQUENCE]
    # The first request has nothing to reuse; the exact repeat of it is served from the cache without a step.
    assert cells[0][3] == "miss" and cells[0][6] == "0 / 4"
    assert cells[3][3] == "exact" and cells[3][4] == "#1" and cells[3][6] == "4 / 0" and cells[3][7] == "0 of 4"
    assert "requests reused earlier work" in printed
    with Image.open(out) as sheet:  # 5 rows of 8 frames, each 32 px scaled 3x with a 2 px gap, labels on the left
        assert sheet.size == (150 + 8 * (96 + 2), 5 * (96 + 2))


def test_demo_refuses_an_output_that_is_not_a_png(tmp_path, capsys):
    assert main(["demo", "--out", str(tmp_path / "demo.gif")]) == 2
    assert ".png" in capsys.readouterr().err
