"""--decoder auto: which decoder for which size and machine kind (choose_decoder, from the
committed table), and the dali+pillow decoder's pixels. No timings here: the table's figures
come from benchmarks/bench_preprocess.py."""
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from clevr_fixture import make_clevr
from PIL import Image

from fastfilm.cli import build_parser
from fastfilm.cli import main as cli_main
from fastfilm.data import cache, decode
from fastfilm.data.cache import prepare, read_meta
from fastfilm.data.decode import MARGIN, choose_decoder, decode_images, load_speeds, nearest_size
from fastfilm.errors import UserError

REPO = Path(__file__).resolve().parents[1]
needs_dali = pytest.mark.skipif(not decode.dali_available(), reason="nvidia-dali not installed")

SPEEDS = {"cpu-test": {"measured_in": {"128": "benchmarks/results/preprocess_cpu-test.json"}, "sizes": {
    "48": {"pillow": 1.0, "dali": 1.30, "dali+pillow": 1.10},
    "128": {"pillow": 1.0, "dali": 0.90, "dali+pillow": 1.20},
    "224": {"pillow": 1.0, "dali": 0.70, "dali+pillow": MARGIN - 0.01},
}}}


def choose(size, **kw):
    return choose_decoder("auto", size, **{"kind": "cpu-test", "speeds": SPEEDS, "dali": True, **kw})


@pytest.mark.parametrize("size, backend", [(48, "dali"), (32, "dali"), (128, "dali+pillow"), (96, "dali+pillow"),
                                           (224, "pillow"), (480, "pillow")])
def test_auto_takes_the_fastest_at_the_nearest_measured_size(size, backend):
    assert choose(size).backend == backend


def test_auto_says_what_and_why_in_one_line():
    why = choose(96).why
    assert "\n" not in why
    assert "dali+pillow for 96 px" in why and "1.20x" in why and "cpu-test at 128 px" in why
    assert "nearest 96 px" in why and "preprocess_cpu-test.json" in why
    slow = choose(224).why  # DALI measured faster, but by less than the margin that pays
    assert "pillow for 224 px" in slow and f"{MARGIN - 0.01:.2f}x" in slow and "dali+pillow" in slow


def test_nearest_size_is_by_ratio_and_ties_go_down():
    assert nearest_size([48, 128, 224], 70) == 48 and nearest_size([48, 128, 224], 80) == 128 and nearest_size([48, 128, 224], 96) == 128
    assert nearest_size([64, 256], 128) == 64
    assert nearest_size([224, 48], 1000) == 224


def test_auto_without_measurements_or_dali_is_pillow():
    unknown = choose(64, kind="cpu-other")
    assert unknown.backend == "pillow" and "no decode speeds measured on a cpu-other machine" in unknown.why
    assert choose(48, dali=False).backend == "pillow"
    assert "not installed" in choose(48, dali=False).why
    only_pillow = {"cpu-test": {"sizes": {"64": {"pillow": 1.0}}}}
    assert choose(64, speeds=only_pillow).backend == "pillow"


def test_auto_on_a_gpu_pipeline_is_dali():
    assert choose(224, device="gpu").backend == "dali"


def test_explicit_decoders():
    for name in decode.BACKENDS:
        assert choose_decoder(name, 224, dali=True, speeds={}).backend == name
    assert choose_decoder("pillow", 224, dali=False).backend == "pillow"
    for name in ("dali", "dali+pillow"):
        with pytest.raises(UserError, match="nvidia-dali is not installed"):
            choose_decoder(name, 224, dali=False)
    with pytest.raises(UserError, match="not one of"):
        choose_decoder("opencv", 224, dali=True)
    ns = build_parser().parse_args(["preprocess", "D", "--decoder", "dali+pillow"])
    assert ns.decoder == "dali+pillow"


def test_committed_table_is_what_the_committed_results_say():
    run = subprocess.run([sys.executable, str(REPO / "benchmarks" / "decoder_table.py"), "--check"],
                         capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    for kind, entry in load_speeds().items():
        assert entry["sizes"] and set(entry["measured_in"]) == set(entry["sizes"]), kind
        for size, rates in entry["sizes"].items():
            assert rates["pillow"] == 1.0 and set(rates) <= set(decode.BACKENDS), (kind, size)


@pytest.fixture
def images(tmp_path):
    """The reader fixture's images: RGBA PNGs, an RGB PNG and a JPEG of odd sizes."""
    root = make_clevr(tmp_path / "CLEVR_v1.0")
    return sorted((root["root"] / "images" / "train").iterdir())


@needs_dali
@pytest.mark.parametrize("size", [7, 16, 64])
def test_dali_pillow_gives_pillows_pixels(images, size):
    a, b = (np.zeros((len(images), size, size, 3), np.uint8) for _ in range(2))
    decode_images(images, size, a, backend="dali+pillow", batch_size=3)  # a partial second batch
    decode_images(images, size, b, backend="pillow")
    for i, p in enumerate(images):
        if p.suffix == ".png":  # lossless: the decoded pixels are the same, and so is the resize
            assert np.array_equal(a[i], b[i]), p.name
        else:  # JPEG: libjpeg-turbo's IDCT in DALI against Pillow's (tests/test_cache.py's bound)
            assert np.abs(a[i].astype(int) - b[i]).mean() < 0.5, p.name


@needs_dali
def test_dali_pillow_names_a_bad_file_or_skips_it(images):
    images[1].write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 4 + b"IEND\xaeB`\x82")
    out = np.zeros((len(images), 8, 8, 3), np.uint8)
    with pytest.raises(UserError, match=images[1].name):
        decode_images(images, 8, out, backend="dali+pillow")
    bad = decode_images(images, 8, out, backend="dali+pillow", skip_bad=True)
    assert [i for i, _ in bad] == [1] and not out[1].any() and out[0].any()


@needs_dali
def test_preprocess_auto_says_which_and_records_it(tmp_path, monkeypatch, capsys):
    root = make_clevr(tmp_path / "CLEVR_v1.0")["root"]
    monkeypatch.setattr(decode, "_cpu_kind", lambda: "cpu-test")
    monkeypatch.setattr(decode, "load_speeds", lambda: SPEEDS)
    assert cli_main(["preprocess", str(root), "--image-size", "100", "--splits", "train"]) == 0
    # Nearest measured: 128 px, where dali+pillow won. Four images decode in no time: the
    # build says nothing on stderr, `fastfilm preprocess` says which decoder in its summary.
    out, err = capsys.readouterr()
    assert f"  {choose(100).why}\n" in out and "decoder auto" not in err
    path = root / ".fastfilm_cache" / "100"
    assert read_meta(path)["decoder"] == "dali+pillow" and read_meta(path)["decoder_choice"] == choose(100).why


@needs_dali
def test_a_long_build_says_which_decoder_on_stderr(tmp_path, monkeypatch, capsys):
    root = make_clevr(tmp_path / "CLEVR_v1.0")["root"]
    monkeypatch.setattr(decode, "_cpu_kind", lambda: "cpu-test")
    monkeypatch.setattr(decode, "load_speeds", lambda: SPEEDS)
    monkeypatch.setattr(cache, "QUIET_BELOW", 4)  # the fixture's train split has 4 images
    prepare(root, 100, splits=("train",))
    lines = [ln for ln in capsys.readouterr().err.splitlines() if "decoder auto" in ln]
    assert lines == [f"fastfilm: {choose(100).why}"]
