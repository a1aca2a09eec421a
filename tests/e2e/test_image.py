"""The sandbox image is SPEC section 4's environment: every library imports and does one
real thing, every tool works, the manifest lists them all with the versions pins.txt
locked, and the system prompt says so. Real server over stdio, real image, real gVisor,
under a 1 GiB sandbox (so the per-command address-space limit is small: java and
wkhtmltopdf must still run)."""

from __future__ import annotations

import base64
import json
import re
import struct
import textwrap
import zlib
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from conftest import Session, connect

pytestmark = pytest.mark.anyio

ROOT = Path(__file__).resolve().parents[2]
SITE = "/usr/local/lib/python3.11/dist-packages"

# SPEC section 4, as written there: distribution -> import name.
LIBRARIES = {
    "pandas": "pandas", "numpy": "numpy", "scipy": "scipy", "scikit-learn": "sklearn",
    "statsmodels": "statsmodels", "matplotlib": "matplotlib", "seaborn": "seaborn",
    "pyarrow": "pyarrow", "openpyxl": "openpyxl", "xlsxwriter": "xlsxwriter", "xlrd": "xlrd",
    "pillow": "PIL", "python-pptx": "pptx", "python-docx": "docx", "pypdf": "pypdf",
    "pdfplumber": "pdfplumber", "pypdfium2": "pypdfium2", "pdf2image": "pdf2image",
    "pdfkit": "pdfkit", "tabula-py": "tabula", "reportlab": "reportlab", "img2pdf": "img2pdf",
    "sympy": "sympy", "mpmath": "mpmath", "tqdm": "tqdm", "python-dateutil": "dateutil",
    "pytz": "pytz", "joblib": "joblib",
}
TOOLS = ["unzip", "unrar", "7z", "bc", "rg", "fd", "sqlite3"]


def locked_versions() -> dict[str, str]:
    text = (ROOT / "sandbox" / "pins.txt").read_text()
    locked = text.split("# ---- locked:", 1)[1].split("\n", 1)[1]
    return dict(line.split()[0].split("==") for line in locked.splitlines() if line.strip())


@pytest.fixture(scope="module")
async def box(engine) -> AsyncIterator[Session]:
    async with connect("--timeout", "90", "--memory", "1g") as session:
        yield session


async def py(box: Session, code: str) -> str:
    """Run a Python script in the sandbox; it must succeed. Returns its stdout."""
    r = await box.bash(f"python3 - <<'PYEOF'\n{textwrap.dedent(code)}\nPYEOF")
    assert r["return_code"] == 0, r
    return r["stdout"]


async def sh(box: Session, command: str) -> str:
    r = await box.bash(command)
    assert r["return_code"] == 0, r
    return r["stdout"]


async def test_manifest_lists_every_library_and_tool_at_the_locked_versions(box):
    manifest = json.loads(await sh(box, "cat /etc/mcp-codeexec/manifest.json"))
    assert manifest["python"].startswith("3.11.")
    locked = locked_versions()
    assert set(manifest["libraries"]) == set(LIBRARIES)
    for dist, module in LIBRARIES.items():
        assert manifest["libraries"][dist] == {"import": module, "version": locked[dist]}
    assert manifest["python_packages"] == locked  # nothing more, nothing less
    for tool in TOOLS:
        entry = manifest["tools"][tool]
        assert entry["path"] and entry["package"] and entry["version"], entry
    # The versions the interpreter itself reports are the manifest's.
    seen = json.loads(await py(box, """
        import importlib.metadata as m, json, sys
        print(json.dumps({"python": sys.version.split()[0], "dists": {d: m.version(d) for d in %r}}))
    """ % sorted(LIBRARIES)))
    assert seen["python"] == manifest["python"]
    assert seen["dists"] == {d: locked[d] for d in LIBRARIES}


async def test_system_prompt_lists_the_manifests_versions(box):
    result = await box.client.read_resource("codeexec://system-prompt")
    text = result.contents[0].text
    locked = locked_versions()
    for dist in LIBRARIES:
        assert f"{dist} {locked[dist]}" in text, dist
    tools_line = next(line for line in text.splitlines() if line.startswith("- Tools:"))
    for tool in TOOLS:
        assert re.search(rf"\b{re.escape(tool)} \d", tools_line), tool
    assert re.search(r"Python 3\.11\.\d+", text)


async def test_every_library_imports_from_the_image_and_nothing_is_shadowed(box):
    out = await py(box, """
        import importlib, json, os
        mods = %r
        print(json.dumps({m: os.path.realpath(importlib.import_module(m).__file__) for m in mods}))
    """ % sorted(LIBRARIES.values()))
    for module, path in json.loads(out).items():
        assert path.startswith(SITE + "/"), (module, path)
    # pip sees them too (Debian's pip, no network).
    listed = await sh(box, "pip list --format=json 2>/dev/null")
    names = {p["name"].lower() for p in json.loads(listed)}
    assert {"pandas", "scikit-learn", "python-pptx", "tabula-py"} <= names


async def test_dataframe_round_trips_through_parquet_xlsx_and_csv(box):
    out = await py(box, """
        import pandas as pd, numpy as np, pyarrow as pa, pyarrow.parquet as pq
        df = pd.DataFrame({"city": ["Oslo", "Lima", "Pune"], "t": [3.5, 19.25, 27.0],
                           "day": pd.to_datetime(["2024-01-01", "2024-01-02", "2024-01-03"])})
        df.to_parquet("d.parquet")
        assert pq.read_table("d.parquet").num_rows == 3
        assert pd.read_parquet("d.parquet").equals(df)
        df.to_excel("d.xlsx", index=False, engine="openpyxl")
        assert pd.read_excel("d.xlsx").equals(df)
        with pd.ExcelWriter("w.xlsx", engine="xlsxwriter") as w:
            df.to_excel(w, index=False, sheet_name="S")
        assert pd.read_excel("w.xlsx", sheet_name="S").equals(df)
        df.to_csv("d.csv", index=False)
        assert pd.read_csv("d.csv", parse_dates=["day"]).equals(df)
        import xlrd, openpyxl
        assert openpyxl.load_workbook("w.xlsx")["S"]["A2"].value == "Oslo"
        print("ok", df["t"].sum(), pa.__version__, xlrd.__version__)
    """)
    assert out.startswith("ok 49.75 ")


async def test_matplotlib_and_seaborn_draw_text_headless(box):
    out = await py(box, """
        import warnings
        warnings.simplefilter("error")  # a missing font is a warning: make it fail
        import matplotlib, matplotlib.pyplot as plt, numpy as np, seaborn as sns
        from matplotlib import font_manager
        from PIL import Image
        assert matplotlib.get_backend().lower() == "agg"
        def ink(path):
            with Image.open(path) as im:
                return int((np.asarray(im.convert("L")) < 128).sum())
        fig = plt.figure(figsize=(3, 1), dpi=100)
        fig.savefig("blank.png")
        fig.text(0.05, 0.4, "Hello, sandbox", fontsize=20)
        fig.savefig("text.png")
        assert ink("blank.png") == 0 and ink("text.png") > 200, (ink("blank.png"), ink("text.png"))
        ax = sns.barplot(x=["a", "b", "c"], y=[1, 3, 2])
        ax.set_title("Chart")
        plt.savefig("chart.png")
        with Image.open("chart.png") as im:
            print("ok", im.size, font_manager.findfont("DejaVu Sans").rsplit("/", 1)[1])
    """)
    assert out.startswith("ok (") and "DejaVuSans" in out
    assert (await sh(box, "head -c 8 chart.png | od -An -c | tr -d ' '")).strip() == "211PNG\\r\\n032\\n"


async def test_pdfs_made_read_rendered_and_tables_extracted(box):
    out = await py(box, """
        from reportlab.lib import colors
        from reportlab.lib.styles import getSampleStyleSheet
        from reportlab.platypus import Paragraph, SimpleDocTemplate, Table, TableStyle
        doc = SimpleDocTemplate("r.pdf")
        table = Table([["fruit", "qty"], ["apple", "3"], ["pear", "5"]])
        table.setStyle(TableStyle([("GRID", (0, 0), (-1, -1), 1, colors.black)]))
        doc.build([Paragraph("Quarterly fruit report", getSampleStyleSheet()["Title"]), table])

        import pypdf
        text = pypdf.PdfReader("r.pdf").pages[0].extract_text()
        assert "Quarterly fruit report" in text and "apple" in text, text

        import pdfplumber
        with pdfplumber.open("r.pdf") as pdf:
            page = pdf.pages[0]
            assert "Quarterly fruit report" in page.extract_text()
            assert page.extract_table() == [["fruit", "qty"], ["apple", "3"], ["pear", "5"]], page.extract_table()

        import pypdfium2 as pdfium
        pdf = pdfium.PdfDocument("r.pdf")
        bitmap = pdf[0].render(scale=0.5).to_pil()
        assert bitmap.size[0] > 200, bitmap.size
        assert "Quarterly" in pdf[0].get_textpage().get_text_range()

        from pdf2image import convert_from_path  # poppler's pdftoppm
        pages = convert_from_path("r.pdf", dpi=50)
        assert len(pages) == 1 and pages[0].size[0] > 200
        pages[0].save("page.png")

        import img2pdf
        with open("img.pdf", "wb") as f:
            f.write(img2pdf.convert("page.png"))
        assert len(pypdf.PdfReader("img.pdf").pages) == 1

        import tabula  # tabula-java, on the JRE
        dfs = tabula.read_pdf("r.pdf", pages=1, lattice=True, force_subprocess=True, silent=True)
        assert dfs[0].to_dict("list") == {"fruit": ["apple", "pear"], "qty": [3, 5]}, dfs

        import pdfkit  # wkhtmltopdf
        pdfkit.from_string("<h1>Hello PDF</h1><p>from HTML</p>", "h.pdf", options={"quiet": ""})
        words = pypdf.PdfReader("h.pdf").pages[0].extract_text().split()  # words come tab-separated
        assert words == ["Hello", "PDF", "from", "HTML"], words
        print("ok")
    """)
    assert out == "ok\n"


async def test_pptx_and_docx_written_and_read(box):
    out = await py(box, """
        from pptx import Presentation
        from pptx.util import Inches
        prs = Presentation()
        slide = prs.slides.add_slide(prs.slide_layouts[1])
        slide.shapes.title.text = "Results"
        slide.placeholders[1].text = "Revenue up 12%"
        from PIL import Image
        Image.new("RGB", (40, 30), (200, 10, 10)).save("red.png")
        slide.shapes.add_picture("red.png", Inches(1), Inches(1), width=Inches(2))
        prs.save("s.pptx")
        read = Presentation("s.pptx")
        texts = [sh.text_frame.text for sh in read.slides[0].shapes if sh.has_text_frame]
        assert texts == ["Results", "Revenue up 12%"], texts
        pictures = [sh for sh in read.slides[0].shapes if sh.shape_type == 13]  # MSO_SHAPE_TYPE.PICTURE
        assert len(pictures) == 1 and pictures[0].image.size == (40, 30), pictures
        assert pictures[0].width == Inches(2) and pictures[0].image.blob == open("red.png", "rb").read()

        import docx
        d = docx.Document()
        d.add_heading("Minutes", 1)
        d.add_paragraph("All agreed.")
        t = d.add_table(rows=1, cols=2)
        t.rows[0].cells[0].text, t.rows[0].cells[1].text = "a", "b"
        d.save("m.docx")
        r = docx.Document("m.docx")
        assert [p.text for p in r.paragraphs] == ["Minutes", "All agreed."]
        assert r.tables[0].rows[0].cells[1].text == "b"
        print("ok")
    """)
    assert out == "ok\n"


async def test_science_and_utilities(box):
    out = await py(box, """
        import sympy as sp, mpmath, numpy as np, scipy.optimize, scipy.stats
        x = sp.symbols("x")
        assert sp.solve(x**2 - 5*x + 6, x) == [2, 3]
        mpmath.mp.dps = 30
        assert str(mpmath.sqrt(2))[:12] == "1.4142135623"
        assert abs(scipy.optimize.brentq(lambda v: v**3 - 8, 0, 5) - 2) < 1e-9

        from sklearn.linear_model import LinearRegression
        X = np.arange(20, dtype=float).reshape(-1, 1)
        y = 3 * X[:, 0] + 1
        model = LinearRegression().fit(X, y)
        assert abs(model.coef_[0] - 3) < 1e-9

        import statsmodels.api as sm
        rng = np.random.default_rng(0)
        xs = rng.normal(size=200)
        ys = 2 * xs + rng.normal(scale=0.1, size=200)
        fit = sm.OLS(ys, sm.add_constant(xs)).fit()
        assert abs(fit.params[1] - 2) < 0.05

        from joblib import Parallel, delayed
        assert Parallel(n_jobs=2)(delayed(pow)(i, 2) for i in range(5)) == [0, 1, 4, 9, 16]

        from tqdm import tqdm
        assert sum(tqdm(range(10), disable=True)) == 45

        from dateutil import parser, relativedelta
        import pytz, datetime
        d = parser.parse("2024-02-29T12:00:00Z")
        assert (d + relativedelta.relativedelta(years=1)).date() == datetime.date(2025, 2, 28)
        assert d.astimezone(pytz.timezone("Asia/Tokyo")).hour == 21
        print("ok")
    """)
    assert out == "ok\n"


def rar4(name: bytes, data: bytes) -> bytes:
    """A RAR 4 archive with one stored file (no free tool writes RAR)."""
    def block(body: bytes) -> bytes:
        return struct.pack("<H", zlib.crc32(body) & 0xFFFF) + body

    head = struct.pack("<BHHIIBIIBBHI", 0x74, 0x8000, 32 + len(name), len(data), len(data), 3,
                       zlib.crc32(data), 0x5A8E3100, 20, 0x30, len(name), 0o100644) + name
    return (b"Rar!\x1a\x07\x00" + block(struct.pack("<BHHHI", 0x73, 0, 13, 0, 0)) + block(head) + data
            + block(struct.pack("<BHH", 0x7B, 0x4000, 7)))


async def test_archives_7z_zip_unzip_unrar(box):
    rar = base64.b64encode(rar4(b"from-rar.txt", b"hello from rar\n")).decode()
    out = await sh(box, f"""
        set -e
        mkdir -p arc/in && cd arc && echo seven > in/a.txt && echo zipped > in/b.txt
        7z a -bd -y t.7z in >/dev/null && rm -r in && 7z x -bd -y t.7z >/dev/null && cat in/a.txt
        zip -qr t.zip in && rm -r in && unzip -q t.zip && cat in/b.txt
        7z a -bd -y -tzip t2.zip in/a.txt >/dev/null && unzip -p t2.zip in/a.txt
        echo {rar} | base64 -d > t.rar && unrar x t.rar >/dev/null && cat from-rar.txt
    """)
    assert out == "seven\nzipped\nseven\nhello from rar\n"


async def test_search_tools_sqlite_and_bc(box):
    out = await sh(box, """
        set -e
        mkdir -p tree/deep/er && echo 'needle 42' > tree/deep/er/hay.txt && echo other > tree/x.md
        rg -n needle tree
        fd hay tree
        fd -e md . tree
        sqlite3 db.sqlite 'create table t(n int); insert into t values (1),(2),(39); select sum(n) from t;'
        echo 'scale=5; 4*a(1)' | bc -l
    """)
    assert out == "tree/deep/er/hay.txt:1:needle 42\ntree/deep/er/hay.txt\ntree/x.md\n42\n3.14156\n"
