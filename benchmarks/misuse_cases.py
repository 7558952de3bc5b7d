"""Misuse cases against cnncodes' command lines and Python API, run as real subprocesses.

Each case runs one command (or a short Python snippet) in a fresh process, in a scratch folder built
from small real images (links into ../shared/datasets/flowers5) and the ``tiny`` backbone with
``--weights none``, and checks what a hostile-but-realistic user would be owed:

- the expected exit status (2 usage error, 1 run error, 0 ok, 130 interrupted);
- a one-line error on stderr that matches the expected words (what was wrong);
- no Python traceback; no hang (a timeout per case);
- where it matters, a check of the outcome itself (no file deleted, right labels, codes kept).

    python benchmarks/misuse_cases.py                 # every case, pass/fail table
    python benchmarks/misuse_cases.py -k csv -j 2     # cases whose name holds "csv", 2 at a time
    python benchmarks/misuse_cases.py --list

Exit status 0 when every case passes. The scratch folder is removed unless --keep.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import struct
import subprocess
import sys
import tempfile
import textwrap
import time
import zlib
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

REPO = Path(__file__).resolve().parents[1]
FLOWERS = REPO.parent / "shared" / "datasets" / "flowers5"
PY = sys.executable
EXTRACT = str(REPO / "scripts" / "extract.py")
TRAIN = str(REPO / "scripts" / "train_svm.py")
PREDICT = str(REPO / "scripts" / "predict.py")
_ROOT = "runs as root, which ignores file permissions" if os.geteuid() == 0 else ""
TINY = ["--model", "tiny", "--weights", "none", "--no-progress"]


# ----------------------------------------------------------------------------------------- fixtures


def link_subset(dst: Path, per_class: int, classes=("daisy", "rose", "tulip"), offset: int = 0) -> Path:
    for cls in classes:
        files = sorted(f for f in os.listdir(FLOWERS / cls) if f.lower().endswith((".jpg", ".jpeg", ".png")))
        (dst / cls).mkdir(parents=True, exist_ok=True)
        for f in files[offset:offset + per_class]:
            os.symlink(FLOWERS / cls / f, dst / cls / f)
    return dst


def first_jpeg(i: int = 0) -> Path:
    d = FLOWERS / "daisy"
    return d / sorted(os.listdir(d))[i]


def png_header_only(path: Path, w: int, h: int) -> None:
    """A PNG whose header declares w x h pixels (a decompression bomb as the header sees it)."""
    def chunk(t, data):
        return struct.pack(">I", len(data)) + t + data + struct.pack(">I", zlib.crc32(t + data) & 0xFFFFFFFF)
    ihdr = struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64))
                     + chunk(b"IEND", b""))


def run(cmd, cwd, timeout=400, env=None, **kw) -> subprocess.CompletedProcess:
    e = dict(os.environ, PYTHONPATH=str(REPO), CNNCODES_CACHE_DIR=str(Path(cwd) / ".memo"))
    e.update(env or {})
    return subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=timeout, env=e,
                          preexec_fn=_default_sigint, **kw)


def _default_sigint():
    # a shell's background job ignores SIGINT, and children inherit that: the SIGINT cases need it back
    signal.signal(signal.SIGINT, signal.SIG_DFL)


@dataclass
class World:
    """Shared, read-only-by-convention inputs: a 3x4 dataset, its cache, a trained run."""

    root: Path
    data: Path = None
    cache: Path = None
    run: Path = None

    def build(self) -> None:
        self.data = link_subset(self.root / "data", 4)
        p = run([PY, EXTRACT, str(self.data), *TINY, "--layers", "conv2", "fc1", "--out", str(self.root / "codes")],
                self.root)
        if p.returncode:
            sys.exit(f"setup: extract failed\n{p.stderr}")
        self.cache = Path(p.stdout.strip().splitlines()[-1])
        p = run([PY, TRAIN, str(self.cache), "--layers", "fc1", "--clf", "softmax", "--no-plots",
                 "--out", str(self.root / "run")], self.root)
        if p.returncode:
            sys.exit(f"setup: train failed\n{p.stderr}")
        self.run = self.root / "run"


@dataclass
class Case:
    name: str
    kind: str
    cmd: Callable[[World, Path], list]          # argv, built in the case's scratch folder
    rc: int | tuple                               # expected exit status(es)
    msg: str = ""                                 # regex the error output must match (stderr+stdout)
    setup: Callable[[World, Path], None] | None = None
    check: Callable[[World, Path, subprocess.CompletedProcess], str | None] | None = None
    timeout: int = 400  # generous: these machines are shared, a busy one takes minutes for a tiny run
    driver: Callable | None = None                # custom runner (signals, concurrency)
    skip: str = ""                                # why this case cannot run here
    result: dict = field(default_factory=dict)


CASES: list[Case] = []


def case(name, kind, cmd, rc, msg="", **kw):
    assert all(c.name != name for c in CASES), f"two cases named {name!r}"
    CASES.append(Case(name, kind, cmd, rc, msg, **kw))


def ex(*args, data=None):
    """argv of an extraction of the shared dataset (or ``data(w, d)``) into the case's folder."""
    return lambda w, d: [PY, EXTRACT, str(data(w, d) if data else w.data), *TINY, "--out", str(d / "codes"),
                         *(a(w, d) if callable(a) else a for a in args)]


def tr(*args, cache=None):
    return lambda w, d: [PY, TRAIN, str(cache(w, d) if cache else w.cache), "--no-plots",
                         *(a(w, d) if callable(a) else a for a in args)]


def pr(*args, run_dir=None):
    return lambda w, d: [PY, PREDICT, str(run_dir(w, d) if run_dir else w.run),
                         *(a(w, d) if callable(a) else a for a in args)]


def api(code: str):
    """A Python snippet run in a fresh process; ``W`` (World paths) and ``D`` (scratch) are defined."""
    def cmd(w, d):
        pre = (f"import cnncodes, cnncodes.errors, cnncodes.predict, cnncodes.classify, sys\nfrom pathlib import Path\nDATA=Path({str(w.data)!r}); "
               f"CACHE=Path({str(w.cache)!r}); RUN=Path({str(w.run)!r}); D=Path({str(d)!r})\n")
        body = textwrap.dedent(code)
        # an API misuse must raise a cnncodes error (a ValueError/KeyError...), never something else
        wrapped = (pre + "try:\n" + textwrap.indent(body, "    ") +
                   "\nexcept cnncodes.errors.CnnCodesError as e:\n"
                   "    print(f'{type(e).__name__}: {e}', file=sys.stderr); sys.exit(3)\n")
        return [PY, "-c", wrapped]
    return cmd


# -------------------------------------------------------------------------------------- the cases
def _img(path: Path, mode="RGB", size=(64, 48), fmt=None, **save):
    from PIL import Image
    import numpy as np
    rng = np.random.default_rng(len(str(path)))
    arr = rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)
    im = Image.fromarray(arr).convert(mode) if mode not in ("I;16",) else Image.fromarray(
        (arr[..., 0].astype(np.uint16) * 257))
    path.parent.mkdir(parents=True, exist_ok=True)
    im.save(path, format=fmt, **save)


def _copy_class(d: Path, cls: str, n: int, src="daisy", offset=0):
    (d / cls).mkdir(parents=True, exist_ok=True)
    files = sorted(os.listdir(FLOWERS / src))[offset:offset + n]
    for f in files:
        os.symlink(FLOWERS / src / f, d / cls / f)


def _data(*w_d):  # the case's own dataset folder; called as (d) or (w, d)
    return w_d[-1] / "ds"


def _csv(*w_d):
    return w_d[-1] / "ds" / "list.csv"


def _write_csv(d: Path, text: str, *, encoding="utf-8", newline="\n", link_images=True):
    ds = d / "ds"
    if link_images:
        link_subset(ds, 3)
    (ds / "list.csv").write_bytes(text.replace("\n", newline).encode(encoding))


def _rows(classes=("daisy", "rose", "tulip"), n=3):
    out = []
    for c in classes:
        files = sorted(os.listdir(FLOWERS / c))[:n]
        out += [(f"{c}/{f}", c) for f in files]
    return out


def _csv_text(rows, header="path,label"):
    return header + "\n" + "".join(f"{p},{lab}\n" for p, lab in rows)


def _no_partial_left(w, d, p):
    left = list((d / "codes").glob("*.partial")) if (d / "codes").exists() else []
    return f"left {left}" if left else None


def _labels_of(cache: Path):
    import h5py
    with h5py.File(cache) as f:
        names = [s.decode() if isinstance(s, bytes) else s for s in f["class_names"][:]]
        return dict(zip(f["paths"].asstr()[:], [names[i] for i in f["labels"][:]])), list(f["status"].asstr()[:])


def _cache_of(p):
    return Path(p.stdout.strip().splitlines()[-1])


# --- extract: bad option values ------------------------------------------------------------------
for name, args, msg in [
    ("batch-size 0", ["--batch-size", "0"], r"batch-size.*range"),
    ("batch-size text", ["--batch-size", "ten"], r"batch-size.*invalid int"),
    ("batch-size huge", ["--batch-size", "99999999999999999999"], r""),
    ("error-budget nan", ["--error-budget", "nan"], r"error-budget"),
    ("error-budget inf", ["--error-budget", "inf"], r"error-budget"),
    ("error-budget -0.1", ["--error-budget", "-0.1"], r"error-budget"),
    ("error-budget 1.5", ["--error-budget", "1.5"], r"error-budget"),
    ("max-pixels 0", ["--max-pixels", "0"], r"max-pixels"),
    ("max-pixels -5", ["--max-pixels", "-5"], r"max-pixels"),
    ("workers -1", ["--workers", "-1"], r"workers"),
    ("grid 0", ["--grid", "0"], r"grid"),
    ("grid -2", ["--grid", "-2"], r"grid"),
    ("layer unknown", ["--layers", "nosuch"], r"nosuch"),
    ("layer empty string", ["--layers", ""], r"layer"),
    ("layer dup", ["--layers", "conv2", "conv2"], r""),
    ("model unknown", ["--model", "nosuch", "--layers", "fc1"], r"nosuch"),
    ("pool bogus", ["--layers", "conv2", "--pool", "median"], r"pool"),
    ("input-size 0", ["--layers", "conv2", "--input-size", "0"], r"input-size"),
    ("input-size huge", ["--layers", "conv2", "--input-size", "1000000"], r"input-size"),
    ("views bogus", ["--layers", "conv2", "--views", "sideways"], r"views"),
    ("views multiscale empty", ["--layers", "conv2", "--views", "multiscale:"], r"views"),
    ("views multiscale 0", ["--layers", "conv2", "--views", "multiscale:0"], r"views|scale"),
    ("views multiscale nan", ["--layers", "conv2", "--views", "multiscale:nan"], r"views|scale"),
    ("name with slash", ["--layers", "conv2", "--name", "../escape"], r"name"),
    ("name empty", ["--layers", "conv2", "--name", ""], r"name"),
    ("weights missing file", ["--layers", "conv2", "--weights", "/nonexistent/w.pth"], r"weights|/nonexistent"),
    ("device cuda no gpu", ["--layers", "conv2", "--device", "cuda"], r"cuda|gpu"),
]:
    rc = 0 if name in ("layer dup", "batch-size huge", "name with slash") else (
        (1, 2) if name == "device cuda no gpu" else 2)
    if name == "weights missing file":
        rc = (1, 2)
    args = list(args)
    if "--layers" not in args:
        args = ["--layers", "conv2", *args]
    if name.startswith("model unknown"):
        case(name, "ext-arg", lambda w, d, a=args: [PY, EXTRACT, str(w.data), "--weights", "none", *a,
                                                     "--out", str(d / "codes")], rc, msg)
    else:
        case(name, "ext-arg", ex(*args), rc, msg)

case("weights a text file", "ext-arg", ex("--layers", "conv2", "--weights", lambda w, d: str(d / "w.pth")), 1,
     r"w\.pth", setup=lambda w, d: (d / "w.pth").write_text("not a state dict"))
case("weights a folder", "ext-arg", ex("--layers", "conv2", "--weights", lambda w, d: str(d)), (1, 2), r"weights")
case("weights empty string", "ext-arg", ex("--layers", "conv2", "--weights", ""), 2, r"weights")
case("data missing", "ext-arg", ex("--layers", "conv2", data=lambda w, d: d / "nope"), (1, 2), r"nope")
case("data empty string", "ext-arg", ex("--layers", "conv2", data=lambda w, d: ""), 2, r"data|DATA|path")
case("data is an image file", "ext-arg", ex("--layers", "conv2", data=lambda w, d: first_jpeg()), (1, 2),
     r"folder|csv")
case("data is the cache folder", "ext-arg", ex("--layers", "conv2", data=lambda w, d: w.cache.parent), (1, 2),
     r"image|class")
case("out is a file", "ext-arg", ex("--layers", "conv2", "--out", lambda w, d: str(d / "f")), (1, 2),
     r"not a folder|file|exists", setup=lambda w, d: (d / "f").write_text("x"))
case("out empty string", "ext-arg", ex("--layers", "conv2", "--out", ""), 2, r"out")
case("out unwritable", "ext-arg", ex("--layers", "conv2", "--out", lambda w, d: str(d / "ro" / "codes")), 1,
     r"ro|permission|writ", setup=lambda w, d: ((d / "ro").mkdir(), (d / "ro").chmod(0o555)), skip=_ROOT)
case("list-layers without model", "ext-arg", lambda w, d: [PY, EXTRACT, "--list-layers"], 2, r"--model")
case("no args", "ext-arg", lambda w, d: [PY, EXTRACT], 2, r"missing")
case("list on missing folder", "ext-arg", lambda w, d: [PY, EXTRACT, "--list", "--out", str(d / "nope")], (0, 1, 2),
     r"no caches|nope")

# --- extract: bad data ----------------------------------------------------------------------------
case("empty folder", "ext-data", ex("--layers", "conv2", data=_data), (1, 2), r"no image|empty",
     setup=lambda w, d: _data(d).mkdir())
case("class folders all empty", "ext-data", ex("--layers", "conv2", data=_data), (1, 2), r"no image|empty",
     setup=lambda w, d: [(_data(d) / c).mkdir(parents=True) for c in ("a", "b")])
case("one class", "ext-data", ex("--layers", "conv2", data=_data), 0, "",
     setup=lambda w, d: _copy_class(_data(d), "only", 3))
case("images loose at the top", "ext-data", ex("--layers", "conv2", data=_data), (1, 2), r"class|folder",
     setup=lambda w, d: [os.symlink(first_jpeg(i), _data(d) / f"{i}.jpg") for i in range(3)] if _data(d).mkdir() is None else 0)


def _mixed_layout(w, d):
    link_subset(_data(d) / "train", 2, ("daisy", "rose"))
    link_subset(_data(d) / "test", 1, ("daisy", "rose"), offset=2)
    link_subset(_data(d), 2, ("tulip",))


case("split folders beside class folders", "ext-data", ex("--layers", "conv2", data=_data), (1, 2),
     r"mixes split folders", setup=_mixed_layout)


def _broken_class(w, d):
    link_subset(_data(d), 3)
    b = _data(d) / "broken"
    b.mkdir()
    (b / "zero.jpg").write_bytes(b"")
    (b / "text.jpg").write_text("hello, I am not a JPEG")
    (b / "trunc.jpg").write_bytes(first_jpeg().read_bytes()[:300])


case("class of broken images over budget", "ext-data", ex("--layers", "conv2", data=_data), 1,
     r"budget|failed", setup=_broken_class)
case("class of broken images within budget", "ext-data",
     ex("--layers", "conv2", "--error-budget", "0.5", data=_data), 0, r"skipped", setup=_broken_class)


def _exotic(w, d):
    from PIL import Image
    import numpy as np
    ds = _data(d)
    link_subset(ds, 2)
    e = ds / "exotic"
    _img(e / "cmyk.jpg", "CMYK")
    _img(e / "p.png", "P")
    _img(e / "rgba.png", "RGBA")
    _img(e / "la.png", "LA")
    _img(e / "one.png", "1")
    _img(e / "g16.png", "I;16")
    Image.fromarray(np.random.default_rng(0).random((40, 30)).astype(np.float32)).save(e / "float.tif")
    Image.fromarray(np.random.default_rng(0).integers(0, 2**20, (40, 30)).astype(np.int32)).save(e / "i32.tif")
    fr = [Image.new("RGB", (30, 20), c) for c in ("red", "green", "blue")]
    fr[0].save(e / "anim.gif", save_all=True, append_images=fr[1:])
    fr[0].save(e / "multi.tif", save_all=True, append_images=fr[1:])
    _img(e / "trunc.png", "RGB", (200, 200))
    (e / "trunc.png").write_bytes((e / "trunc.png").read_bytes()[:500])
    _img(e / "tiny1x1.png", "RGB", (1, 1))
    _img(e / "strip.png", "RGB", (3, 4000))
    _img(e / "webp.webp", "RGB")
    _img(e / "bmp.bmp", "RGB")
    png_header_only(e / "bomb.png", 50000, 50000)
    _img(e / "misnamed.jpg", "RGB", fmt="PNG")


def _exotic_check(w, d, p):
    labels, status = _labels_of(_cache_of(p))
    import h5py
    with h5py.File(_cache_of(p)) as f:
        st = dict(zip(f["paths"].asstr()[:], f["status"].asstr()[:]))
        msg = dict(zip(f["paths"].asstr()[:], f["message"].asstr()[:]))
    want_err = {"exotic/trunc.png", "exotic/bomb.png"}
    bad = [k for k, v in st.items() if (v != "ok") != (k in want_err)]
    return f"unexpected status: {[(k, st[k], msg[k]) for k in bad]}" if bad else None


case("exotic image modes", "ext-data", ex("--layers", "conv2", "--error-budget", "0.5", data=_data), 0, "",
     setup=_exotic, check=_exotic_check)


def _odd_names(w, d):
    ds = _data(d)
    for cls in ("daisy, white", "rosé 🌹", " tulip ", "1", "01"):
        (ds / cls).mkdir(parents=True)
    srcs = sorted(os.listdir(FLOWERS / "daisy"))
    names = ["a,b.jpg", "new\nline.jpg", "ünï cödé.jpg", " lead space.jpg", "quote\".jpg"]
    for ci, cls in enumerate(sorted(os.listdir(ds))):
        for j, n in enumerate(names):
            os.symlink(FLOWERS / "daisy" / srcs[ci * 5 + j], ds / cls / n)


def _odd_names_check(w, d, p):
    labels, status = _labels_of(_cache_of(p))
    bad = [(k, v) for k, v in labels.items() if k.split("/")[0] != v]
    if len(labels) != 25:
        return f"{len(labels)} rows, want 25"
    return f"labels differ from folders: {bad[:3]}" if bad else None


case("unicode comma newline names", "ext-data", ex("--layers", "conv2", data=_data), 0, "", setup=_odd_names,
     check=_odd_names_check)

# --- extract: CSV lists ---------------------------------------------------------------------------


def _csv_labels_check(expect: dict):
    """The cache's label of every image (paths compared as absolute, normalised paths) is the CSV's."""
    def check(w, d, p):
        def norm(k):
            return os.path.normpath(os.path.join(d / "ds", k))
        labels, status = _labels_of(_cache_of(p))
        got = {norm(k): v for k, v in labels.items()}
        want = {norm(k): v for k, v in expect.items()}
        diff = {k: (got.get(k), v) for k, v in want.items() if got.get(k) != v}
        extra = set(got) - set(want)
        return f"labels {diff} extra {extra}" if diff or extra else None
    return check


R = _rows()
case("csv plain", "csv", ex("--layers", "conv2", data=_csv), 0, "",
     setup=lambda w, d: _write_csv(d, _csv_text(R)), check=_csv_labels_check(dict(R)))
case("csv BOM", "csv", ex("--layers", "conv2", data=_csv), 0, "",
     setup=lambda w, d: _write_csv(d, _csv_text(R), encoding="utf-8-sig"), check=_csv_labels_check(dict(R)))
case("csv CRLF", "csv", ex("--layers", "conv2", data=_csv), 0, "",
     setup=lambda w, d: _write_csv(d, _csv_text(R), newline="\r\n"), check=_csv_labels_check(dict(R)))
case("csv quoted fields", "csv", ex("--layers", "conv2", data=_csv), 0, "",
     setup=lambda w, d: _write_csv(d, "path,label\n" + "".join(f'"{p}","{l}"\n' for p, l in R)),
     check=_csv_labels_check(dict(R)))
case("csv 0 rows", "csv", ex("--layers", "conv2", data=_csv), (1, 2), r"no (image|row)|empty",
     setup=lambda w, d: _write_csv(d, "path,label\n"))
case("csv empty file", "csv", ex("--layers", "conv2", data=_csv), (1, 2), r"empty|header",
     setup=lambda w, d: _write_csv(d, ""))
case("csv no label column", "csv", ex("--layers", "conv2", data=_csv), (1, 2), r"label",
     setup=lambda w, d: _write_csv(d, "path\n" + "".join(f"{p}\n" for p, _ in R)))
case("csv missing field in a row", "csv", ex("--layers", "conv2", data=_csv), (1, 2), r"line|row",
     setup=lambda w, d: _write_csv(d, _csv_text(R) + "daisy/x.jpg\n"))
case("csv empty label", "csv", ex("--layers", "conv2", data=_csv), (1, 2), r"label",
     setup=lambda w, d: _write_csv(d, _csv_text(R) + f"{R[0][0]},\n"))
case("csv duplicate path same label", "csv", ex("--layers", "conv2", data=_csv), (0, 1, 2), r"",
     setup=lambda w, d: _write_csv(d, _csv_text(R + [R[0]])), check=None)
case("csv duplicate path other label", "csv", ex("--layers", "conv2", data=_csv), (1, 2), r"duplicate|twice|more than once",
     setup=lambda w, d: _write_csv(d, _csv_text(R + [(R[0][0], "rose")])))
case("csv same file via ./ and plain", "csv", ex("--layers", "conv2", data=_csv), (1, 2), r"duplicate|twice|same",
     setup=lambda w, d: _write_csv(d, _csv_text(R + [("./" + R[0][0], "rose")])))
case("csv missing image", "csv", ex("--layers", "conv2", data=_csv), (1, 2), r"missing\.jpg",
     setup=lambda w, d: _write_csv(d, _csv_text(R + [("daisy/missing.jpg", "daisy")])))
case("csv dotdot path", "csv", ex("--layers", "conv2", data=_csv), 0, "",
     setup=lambda w, d: (_write_csv(d, _csv_text(R + [("../extra.jpg", "daisy")])),
                         os.symlink(first_jpeg(9), d / "extra.jpg")),
     check=_csv_labels_check({**dict(R), "../extra.jpg": "daisy"}))
case("csv absolute path", "csv", ex("--layers", "conv2", data=_csv), 0, "",
     setup=lambda w, d: _write_csv(d, _csv_text(R + [(str(first_jpeg(9)), "daisy")])))
case("csv numeric-looking labels", "csv", ex("--layers", "conv2", data=_csv), 0, "",
     setup=lambda w, d: _write_csv(d, _csv_text([(p, {"daisy": "01", "rose": "1", "tulip": "1.0"}[l]) for p, l in R])),
     check=_csv_labels_check({p: {"daisy": "01", "rose": "1", "tulip": "1.0"}[l] for p, l in R}))
case("csv bad split value", "csv", ex("--layers", "conv2", data=_csv), (1, 2), r"split",
     setup=lambda w, d: _write_csv(d, "path,label,split\n" + "".join(f"{p},{l},training\n" for p, l in R)))
case("csv latin-1 encoded", "csv", ex("--layers", "conv2", data=_csv), (0, 1, 2), r"",
     setup=lambda w, d: _write_csv(d, _csv_text([(p, l + "é") for p, l in R]), encoding="latin-1"))
case("csv path is a folder", "csv", ex("--layers", "conv2", data=_csv), (1, 2), r"daisy",
     setup=lambda w, d: _write_csv(d, _csv_text(R + [("daisy", "daisy")])))
case("csv header only spaces", "csv", ex("--layers", "conv2", data=_csv), 0, "",
     setup=lambda w, d: _write_csv(d, "path, label\n" + "".join(f"{p}, {l}\n" for p, l in R)),
     check=_csv_labels_check(dict(R)))

# --- cache misuse ---------------------------------------------------------------------------------


def _copy_cache(w, d, mutate=None):
    dst = d / w.cache.name
    shutil.copy(w.cache, dst)
    if mutate:
        mutate(dst)
    return dst


def _truncate(p):
    b = p.read_bytes()
    p.write_bytes(b[: len(b) // 2])


def _flip_codes(p):
    import h5py
    with h5py.File(p, "r+") as f:
        x = f["codes/fc1"][:]
        x[0, 0] += 1
        f["codes/fc1"][...] = x


def _plain_h5(p):
    import h5py
    import numpy as np
    p.unlink()
    with h5py.File(p, "w") as f:
        f["codes/fc1"] = np.zeros((4, 3))
        f["labels"] = np.zeros(4, int)


_C = lambda w, d: d / w.cache.name  # noqa: E731
case("train truncated h5", "cache", tr("--layers", "fc1", "--out", lambda w, d: str(d / "r"), cache=_C), 1,
     r"corrupt|truncat|damaged|cannot (read|open)", setup=lambda w, d: _copy_cache(w, d, _truncate))
case("train tampered codes", "cache", tr("--layers", "fc1", "--out", lambda w, d: str(d / "r"), cache=_C), 1,
     r"sha256|corrupt|checksum", setup=lambda w, d: _copy_cache(w, d, _flip_codes))
case("train plain h5py file", "cache", tr("--layers", "fc1", "--out", lambda w, d: str(d / "r"), cache=_C), 1,
     r"not a cnncodes|cache", setup=lambda w, d: _copy_cache(w, d, _plain_h5))
case("train random bytes .h5", "cache", tr("--layers", "fc1", "--out", lambda w, d: str(d / "r"), cache=_C), 1,
     r"hdf5|cache|corrupt", setup=lambda w, d: (d / w.cache.name).write_bytes(os.urandom(4096)))
case("train missing cache", "cache", tr("--layers", "fc1", cache=lambda w, d: d / "nope.h5"), (1, 2), r"nope\.h5")
case("train cache is a folder", "cache", tr("--layers", "fc1", cache=lambda w, d: d), (1, 2), r"folder|director")
case("train unknown layer", "cache", tr("--layers", "fc9", "--out", lambda w, d: str(d / "r")), (1, 2),
     r"fc9.*(fc1|conv2)")
case("train layer empty", "cache", tr("--layers", "", "--out", lambda w, d: str(d / "r")), 2, r"layer")
case("train a jpeg as cache", "cache", tr("--layers", "fc1", cache=lambda w, d: first_jpeg()), (1, 2), r"hdf5|cache")
case("load_codes unknown layer", "api", api("cnncodes.load_codes(CACHE, 'fc9')"), 3, r"fc9")
case("load_codes missing file", "api", api("cnncodes.load_codes(D / 'x.h5', 'fc1')"), (1, 3), r"x\.h5")
case("load_codes layers None", "api", api("cnncodes.load_codes(CACHE, None)"), 3, r"layers")
case("load_codes empty list", "api", api("cnncodes.load_codes(CACHE, [])"), 3, r"layer")


def _ro_cache_new_layer(w, d):
    shutil.copytree(w.cache.parent, d / "codes")
    for p in (d / "codes").iterdir():
        p.chmod(0o444)
    (d / "codes").chmod(0o555)


case("read-only cache folder hit", "cache", ex("--layers", "conv2", "fc1"), 0, "", setup=_ro_cache_new_layer)
case("read-only cache folder new layer", "cache", ex("--layers", "conv1"), 1, r"permission|read-only|writ",
     setup=_ro_cache_new_layer, skip=_ROOT)
case("predict run whose cache is gone", "cache",
     pr(lambda w, d: str(first_jpeg(20)), run_dir=lambda w, d: d / "run"), 0, "",
     setup=lambda w, d: (shutil.copytree(w.run, d / "run", symlinks=True)))

# --- train arguments ------------------------------------------------------------------------------
for name, args, msg in [
    ("c-min nan", ["--c-min", "nan"], r"c-min"),
    ("c-max inf", ["--c-max", "inf"], r"c-max"),
    ("c-min 0", ["--c-min", "0"], r"c-min"),
    ("c-num 1", ["--c-num", "1"], r"c-num"),
    ("c-num huge", ["--c-num", "100000000"], r"c-num"),
    ("grid nan", ["--grid", "nan"], r"grid"),
    ("grid negative", ["--grid", "-1", "1"], r"grid"),
    ("grid zero", ["--grid", "0"], r"grid"),
    ("grid inf", ["--grid", "inf"], r"grid"),
    ("cv 1", ["--cv", "1"], r"cv"),
    ("val-fraction 1.5", ["--val-fraction", "1.5"], r"val-fraction"),
    ("val-fraction nan", ["--val-fraction", "nan"], r"val-fraction"),
    ("test-fraction 0", ["--test-fraction", "0"], r"test-fraction"),
    ("test-fraction nan", ["--test-fraction", "nan"], r"test-fraction"),
    ("fractions sum >= 1", ["--val-fraction", "0.5", "--test-fraction", "0.6"], r"fraction"),
    ("n-jobs 0", ["--n-jobs", "0"], r"n-jobs"),
    ("max-iter 0", ["--max-iter", "0"], r"max-iter"),
    ("early-stop -1", ["--early-stop", "-1"], r"early-stop"),
    ("seed -1", ["--seed", "-1"], r"seed"),
    ("seed huge", ["--seed", str(2**40)], r"seed"),
]:
    case(name, "tr-arg", tr("--layers", "fc1", *args, "--out", lambda w, d: str(d / "r")), 2, msg.replace("-", "[-_]"),
         check=lambda w, d, p: "run folder written" if (d / "r").exists() else None)

case("out is the cache folder", "tr-arg", tr("--layers", "fc1", "--out", lambda w, d: str(w.cache.parent)), 2,
     r"cache")
case("out is the repo root", "tr-arg", tr("--layers", "fc1", "--out", str(REPO), "--overwrite"), 2, r"refus|folder")
case("out is cwd", "tr-arg", tr("--layers", "fc1", "--out", "."), 2, r"current|folder")
case("train out is a file", "tr-arg", tr("--layers", "fc1", "--out", lambda w, d: str(d / "f")), 2, r"file",
     setup=lambda w, d: (d / "f").write_text("keep me"),
     check=lambda w, d, p: None if (d / "f").read_text() == "keep me" else "file changed")
case("out is a symlink to a run", "tr-arg",
     tr("--layers", "fc1", "--out", lambda w, d: str(d / "ln"), "--overwrite"), 2, r"link",
     setup=lambda w, d: os.symlink(w.run, d / "ln"),
     check=lambda w, d, p: None if (w.run / "metrics.json").exists() else "shared run deleted")
case("out non-empty foreign folder overwrite", "tr-arg",
     tr("--layers", "fc1", "--out", lambda w, d: str(d / "thesis"), "--overwrite"), 2, r"marker|not a.*run|refus",
     setup=lambda w, d: ((d / "thesis").mkdir(), (d / "thesis" / "ch1.tex").write_text("x")),
     check=lambda w, d, p: None if (d / "thesis" / "ch1.tex").exists() else "user file deleted")
case("train out empty string", "tr-arg", tr("--layers", "fc1", "--out", ""), 2, r"out")
case("runs-root is a file", "tr-arg", tr("--layers", "fc1", "--runs-root", lambda w, d: str(d / "f")), (1, 2),
     r"runs-root|file|not a folder", setup=lambda w, d: (d / "f").write_text("x"))
case("layers duplicated", "tr-arg", tr("--layers", "fc1", "fc1", "--out", lambda w, d: str(d / "r")), (0, 2), r"")
case("concat one layer", "tr-arg", tr("--layers", "fc1", "--concat", "--out", lambda w, d: str(d / "r")), (0, 2), r"")
case("clf bogus", "tr-arg", tr("--layers", "fc1", "--clf", "knn"), 2, r"clf")

# --- train: degenerate data -----------------------------------------------------------------------


def _extract_then(setup_ds, *ex_args):
    """A setup that builds a dataset, extracts it (fc1) into d/codes and leaves the cache path in d/cache.txt."""
    def setup(w, d):
        setup_ds(w, d)
        p = run([PY, EXTRACT, str(_data(d)), *TINY, "--layers", "fc1", "--out", str(d / "codes"), *ex_args], d)
        if p.returncode:
            raise RuntimeError(p.stderr[-400:])
        (d / "cache.txt").write_text(_cache_of(p).as_posix())
    return setup


_CT = lambda w, d: (d / "cache.txt").read_text()  # noqa: E731
case("train one class", "tr-data", tr("--layers", "fc1", "--out", lambda w, d: str(d / "r"), cache=_CT), (1, 2),
     r"class", setup=_extract_then(lambda w, d: _copy_class(_data(d), "only", 6)))
case("train one image per class", "tr-data", tr("--layers", "fc1", "--out", lambda w, d: str(d / "r"), cache=_CT),
     (0, 1), r"", setup=_extract_then(lambda w, d: link_subset(_data(d), 1)))
case("train two images per class", "tr-data", tr("--layers", "fc1", "--out", lambda w, d: str(d / "r"), cache=_CT),
     (0, 1), r"", setup=_extract_then(lambda w, d: link_subset(_data(d), 2)))
case("train class of only broken images", "tr-data",
     tr("--layers", "fc1", "--out", lambda w, d: str(d / "r"), cache=_CT), (0, 1), r"broken",
     setup=_extract_then(_broken_class, "--error-budget", "0.9"))
case("train 200 vs 2 images", "tr-data",
     tr("--layers", "fc1", "--clf", "softmax", "--out", lambda w, d: str(d / "r"), cache=_CT), 0, r"",
     setup=_extract_then(lambda w, d: (_copy_class(_data(d), "big", 40), _copy_class(_data(d), "small", 2, "rose"))))

# --- predict ---------------------------------------------------------------------------------------
case("predict folder not a run", "predict", pr(lambda w, d: str(first_jpeg()), run_dir=lambda w, d: w.data),
     (1, 2), r"run|model")
case("predict empty folder as run", "predict", pr(lambda w, d: str(first_jpeg()), run_dir=lambda w, d: d), (1, 2),
     r"run|model")
case("predict cache as run", "predict", pr(lambda w, d: str(first_jpeg()), run_dir=lambda w, d: w.cache), (1, 2),
     r"run|model|skops")
case("predict missing image", "predict", pr(lambda w, d: str(d / "nope.jpg")), (1, 2), r"nope\.jpg")
case("predict no images in folder", "predict", pr(lambda w, d: str(d / "empty")), (1, 2), r"no image|empty",
     setup=lambda w, d: (d / "empty").mkdir())
case("predict all images broken", "predict", pr(lambda w, d: str(d / "bad")), (0, 1), r"could not|error",
     setup=lambda w, d: ((d / "bad").mkdir(), (d / "bad" / "a.jpg").write_bytes(b""),
                         (d / "bad" / "b.png").write_text("x")))
case("predict model unknown", "predict", pr(lambda w, d: str(first_jpeg()), "--model", "fc9__svm"), 2,
     r"fc9__svm.*fc1__softmax")
case("predict batch-size 0", "predict", pr(lambda w, d: str(first_jpeg()), "--batch-size", "0"), 2, r"batch-size")
case("predict max-pixels -1", "predict", pr(lambda w, d: str(first_jpeg()), "--max-pixels", "-1"), 2, r"max-pixels")
case("predict out in missing folder", "predict",
     pr(lambda w, d: str(first_jpeg()), "--out", lambda w, d: str(d / "no" / "p.csv")), 0, r"",
     check=lambda w, d, p: None if "daisy" in (d / "no" / "p.csv").read_text() else "no prediction written")
case("predict out is a folder", "predict", pr(lambda w, d: str(first_jpeg()), "--out", lambda w, d: str(d)), (1, 2),
     r"folder|director")
case("predict out bad extension", "predict",
     pr(lambda w, d: str(first_jpeg()), "--out", lambda w, d: str(d / "p.xlsx")), 2, r"csv|json")
case("predict out is the model", "predict",
     pr(lambda w, d: str(first_jpeg()), "--out", lambda w, d: str(d / "run" / "model.skops"), run_dir=lambda w, d: d / "run"),
     (1, 2), r"model|csv|json|run", setup=lambda w, d: shutil.copytree(w.run, d / "run", symlinks=True),
     check=lambda w, d, p: None if (d / "run" / "model.skops").read_bytes()[:2] == b"PK" else "model overwritten")


def _tamper(rel, how):
    def setup(w, d):
        shutil.copytree(w.run, d / "run", symlinks=True)
        f = d / "run" / rel
        if how == "flip":
            b = bytearray(f.read_bytes())
            b[len(b) // 2] ^= 0xFF
            f.write_bytes(bytes(b))
        elif how == "garbage":
            f.write_text("{not json")
        elif how == "delete":
            f.unlink()
        elif how == "empty":
            f.write_bytes(b"")
    return setup


def _sidecar(w):
    return next(p.name for p in w.run.iterdir() if p.name.startswith("model") and p.suffix == ".json")


case("predict tampered model", "predict", pr(lambda w, d: str(first_jpeg()), run_dir=lambda w, d: d / "run"), 1,
     r"sha256|damaged|corrupt|changed", setup=_tamper("model.skops", "flip"))
case("predict empty model file", "predict", pr(lambda w, d: str(first_jpeg()), run_dir=lambda w, d: d / "run"), 1,
     r"model", setup=_tamper("model.skops", "empty"))
# without model.skops the best of models/ is used: fine
case("predict model missing", "predict", pr(lambda w, d: str(first_jpeg()), run_dir=lambda w, d: d / "run"), 0,
     r"", setup=_tamper("model.skops", "delete"))
case("predict sidecar garbage", "predict", pr(lambda w, d: str(first_jpeg()), run_dir=lambda w, d: d / "run"), 1,
     r"json|sidecar", setup=lambda w, d: _tamper(_sidecar(w), "garbage")(w, d))
case("predict sidecar missing", "predict", pr(lambda w, d: str(first_jpeg()), run_dir=lambda w, d: d / "run"), 1,
     r"json|sidecar", setup=lambda w, d: _tamper(_sidecar(w), "delete")(w, d))
case("predict metrics garbage", "predict", pr(lambda w, d: str(first_jpeg()), run_dir=lambda w, d: d / "run"),
     (0, 1), r"", setup=_tamper("metrics.json", "garbage"))
case("predict image path as string api", "api",
     api("r = cnncodes.predict.predict(RUN, str(DATA / 'daisy'))\nprint(len(r))"), 3, r"image_paths|list|sequence")
case("extract layers as a string api", "api",
     api("r = cnncodes.extract(DATA, 'tiny', 'fc1', weights='none', out=D / 'codes', progress=False)\n"
         "print(r.keys)\nassert list(r.keys) == ['fc1'], r.keys"), (0, 3), r"")
case("train_run layers as a string api", "api",
     api("import cnncodes.classify as c\nr = c.train_run(CACHE, 'fc1', out=D / 'r', plots=False)\n"
         "import json; k = list(json.load(open(D / 'r' / 'metrics.json'))['results']); assert k == ['fc1'], k"),
     (0, 3), r"")
case("extract twice in one process", "api",
     api("a = cnncodes.extract(DATA, 'tiny', ['fc1'], weights='none', out=D / 'codes', progress=False)\n"
         "b = cnncodes.extract(DATA, 'tiny', ['fc1', 'conv2'], weights='none', out=D / 'codes', progress=False)\n"
         "import numpy as np\nx = cnncodes.load_codes(a.path, 'fc1').X; y = cnncodes.load_codes(b.path, 'fc1').X\n"
         "assert a.path == b.path and np.array_equal(x, y, equal_nan=True)"), 0, "")
case("train_run twice same out api", "api",
     api("import cnncodes.classify as c\nc.train_run(CACHE, ['fc1'], out=D / 'r', plots=False)\n"
         "c.train_run(CACHE, ['fc1'], out=D / 'r', plots=False)"), 3, r"exists|overwrite")


# --- concurrency, signals -------------------------------------------------------------------------


def _two_at_once(argv_fn, want_one_refused=False):
    def driver(c, w, d):
        argv = argv_fn(w, d)
        e = dict(os.environ, PYTHONPATH=str(REPO), CNNCODES_CACHE_DIR=str(d / ".memo"))
        ps = [subprocess.Popen(argv, cwd=d, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=e,
                              preexec_fn=_default_sigint)
              for _ in range(2)]
        outs = [p.communicate(timeout=c.timeout) for p in ps]
        rcs = sorted(p.returncode for p in ps)
        both = "\n".join(o[1] for o in outs)
        # judged as one process: the worst exit and all of stderr
        res = subprocess.CompletedProcess(argv, 0 if rcs in ([0, 0], [0, 1]) else rcs[-1], outs[0][0] + outs[1][0],
                                          both)
        res.rcs = rcs
        return res
    return driver


def _ext_two(w, d):
    link_subset(_data(d), 4)


case("extract twice at once", "concur", None, 0, r"", setup=_ext_two,
     driver=_two_at_once(lambda w, d: [PY, EXTRACT, str(_data(d)), *TINY, "--layers", "fc1", "--out", str(d / "codes")]),
     check=lambda w, d, p: (f"rcs {p.rcs}" if p.rcs == [0, 1] and not re.search(r"lock|another|writer", p.stderr, re.I)
                            else None))
case("train twice at once same out", "concur", None, 0, r"",
     driver=_two_at_once(lambda w, d: [PY, TRAIN, str(w.cache), "--layers", "fc1", "--clf", "softmax", "--no-plots",
                                       "--out", str(d / "r")]),
     check=lambda w, d, p: None if (d / "r" / "metrics.json").exists() else "no run")


def _interrupt(argv_fn, after_s, then_argv=None, ready=None):
    """SIGINT ``after_s`` seconds after ``ready(d)`` holds (or after start), then run ``then_argv``."""
    def driver(c, w, d):
        argv = argv_fn(w, d)
        e = dict(os.environ, PYTHONPATH=str(REPO), CNNCODES_CACHE_DIR=str(d / ".memo"))
        p = subprocess.Popen(argv, cwd=d, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=e,
                              preexec_fn=_default_sigint)
        for _ in range(1200):
            if ready is None or ready(d) or p.poll() is not None:
                break
            time.sleep(0.1)
        time.sleep(after_s)
        finished_first = p.poll() is not None
        p.send_signal(signal.SIGINT)
        out, err = p.communicate(timeout=c.timeout)
        if finished_first:  # the case tests nothing: say so instead of reporting a wrong exit status
            err += "\n[misuse_cases: the command ended before the SIGINT; make the case longer]"
        res = subprocess.CompletedProcess(argv, p.returncode, out, err)
        if then_argv:
            q = run(then_argv(w, d), d, timeout=c.timeout)
            res.then = q
        return res
    return driver


def _big_ds(w, d):
    link_subset(_data(d), 60)


def _resume_check(w, d, p):
    q = p.then
    if q.returncode:
        return f"resume failed: {q.stderr[-200:]}"
    if p.returncode == 130 and not re.search(r"resum|already done", q.stderr, re.I):
        return "second run did not resume"
    return None


_EXT_BIG = lambda w, d: [PY, EXTRACT, str(_data(d)), *TINY, "--layers", "fc1", "--batch-size", "8",  # noqa: E731
                         "--out", str(d / "codes")]
case("extract SIGINT then resume", "signal", None, 130, r"interrupted", setup=_big_ds, timeout=240,
     # at once: tiny extracts these 300 images in ~0.3 s here, and a SIGINT while the finished process shuts down
     # meets Python's default handler (exit -2), which is not what this case is about
     driver=_interrupt(_EXT_BIG, 0.0, then_argv=_EXT_BIG,
                       ready=lambda d: bool(list((d / "codes").glob("*.partial/shard-*")))), check=_resume_check)
case("train SIGINT", "signal", None, 130, r"interrupt", timeout=120,
     driver=_interrupt(lambda w, d: [PY, TRAIN, str(w.cache), "--layers", "fc1", "conv2", "--out", str(d / "r")], 0.5,
                       ready=lambda d: any(x.name.startswith(".") for x in d.iterdir())),
     check=lambda w, d, p: (None if not (d / "r").exists() or (d / "r" / "metrics.json").exists()
                            else f"half-written run folder: {sorted(x.name for x in (d / 'r').iterdir())}"))
case("predict SIGINT", "signal", None, 130, r"interrupt", timeout=120,
     driver=_interrupt(lambda w, d: [PY, PREDICT, str(w.run), str(FLOWERS / "daisy"), "--out", str(d / "p.csv")], 2.0),
     check=lambda w, d, p: "partial output" if (d / "p.csv").exists() else None)


def _killed_then_train(c, w, d):
    _big_ds(w, d)
    e = dict(os.environ, PYTHONPATH=str(REPO), CNNCODES_CACHE_DIR=str(d / ".memo"))
    p = subprocess.Popen(_EXT_BIG(w, d), cwd=d, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=e,
                              preexec_fn=_default_sigint)
    for _ in range(600):  # until the first shard is on disk
        if list((d / "codes").glob("*.partial/shard-*")):
            break
        time.sleep(0.1)
    p.kill()
    p.communicate()
    caches = [Path(str(x)[:-len(".partial")]) for x in (d / "codes").glob("*.partial")]
    target = str(caches[0]) if caches else str(d / "codes" / "missing.h5")
    return run([PY, TRAIN, target, "--layers", "fc1", "--out", str(d / "r")], d)


case("killed extract then train", "signal", None, 1, r"resume|unfinished|progress",
     driver=_killed_then_train, timeout=200)


# ---------------------------------------------------------------------------------------- running


def has_traceback(text: str) -> bool:
    return "Traceback (most recent call last)" in text


def judge(c: Case, w: World, d: Path, p: subprocess.CompletedProcess) -> str | None:
    out = (p.stderr or "") + (p.stdout or "")
    want = c.rc if isinstance(c.rc, tuple) else (c.rc,)
    if has_traceback(out):
        return "traceback: " + out.strip().splitlines()[-1][:160]
    if p.returncode not in want:
        return f"exit {p.returncode}, want {want}: " + (out.strip().splitlines() or [""])[-1][:160]
    if c.msg and not re.search(c.msg, out, re.I | re.S):
        return f"message does not match /{c.msg}/: " + (out.strip().splitlines() or [""])[-1][:160]
    if c.check:
        return c.check(w, d, p)
    return None


def run_case(c: Case, w: World) -> Case:
    d = w.root / "cases" / re.sub(r"\W", "_", f"{c.kind}-{c.name}")
    t0 = time.monotonic()
    if c.skip:
        c.result = {"ok": True, "why": f"skipped: {c.skip}", "rc": None, "line": "", "s": 0.0}
        return c
    try:
        d.mkdir(parents=True)
        if c.setup:
            c.setup(w, d)
        if c.driver:
            p = c.driver(c, w, d)
        else:
            p = run(c.cmd(w, d), d, timeout=c.timeout)
        err = judge(c, w, d, p)
        c.result = {"ok": err is None, "why": err or "", "rc": p.returncode,
                    "line": ((p.stderr or "").strip().splitlines() or [""])[-1][:140]}
    except subprocess.TimeoutExpired:
        c.result = {"ok": False, "why": f"hang: no exit within {c.timeout} s", "rc": None, "line": ""}
    except Exception as e:  # a broken case must not stop the table
        c.result = {"ok": False, "why": f"case error: {type(e).__name__}: {e}", "rc": None, "line": ""}
    c.result["s"] = round(time.monotonic() - t0, 1)
    return c


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("-k", default="", help="only cases whose name or kind contains this")
    ap.add_argument("-j", type=int, default=1, help="cases at a time")
    ap.add_argument("--list", action="store_true")
    ap.add_argument("--keep", action="store_true", help="keep the scratch folder")
    ap.add_argument("--json", default=None, help="write the results here")
    a = ap.parse_args(argv)
    cases = [c for c in CASES if a.k in c.name or a.k in c.kind]
    if a.list:
        for c in cases:
            print(f"{c.kind:<10} {c.name}")
        return 0
    root = Path(tempfile.mkdtemp(prefix="cnncodes-misuse-"))
    try:
        w = World(root)
        w.build()
        with ThreadPoolExecutor(a.j) as pool:
            done = list(pool.map(lambda c: run_case(c, w), cases))
        n_fail = sum(not c.result["ok"] for c in done)
        print(f"{'':4} {'kind':<9} {'case':<44} {'rc':>4} {'s':>5}  detail")
        for c in done:
            r = c.result
            print(f"{'ok' if r['ok'] else 'FAIL':<4} {c.kind:<9} {c.name:<44} {str(r['rc']):>4} {r['s']:>5}  "
                  f"{r['why'] or r['line']}")
        print(f"\n{len(done) - n_fail}/{len(done)} cases pass")
        if a.json:
            Path(a.json).write_text(json.dumps({c.name: {"kind": c.kind, **c.result} for c in done}, indent=1))
        return 1 if n_fail else 0
    finally:
        if a.keep:
            print(f"scratch kept in {root}")
        else:
            for p in root.rglob("*"):  # read-only folders made by cases
                if p.is_dir() and not p.is_symlink():
                    p.chmod(0o755)
            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
