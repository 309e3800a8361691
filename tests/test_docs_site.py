"""``psgd_lab.docs.check_site`` (the link check of ``psgd-lab docs``) on a toy site."""

from __future__ import annotations

from psgd_lab import cli
from psgd_lab import docs as docs_mod

PAGE = """<html><head>
<link rel="stylesheet" href="{css}">{head}
</head><body><h1 id="top">t</h1><a name="old-anchor"></a>{body}</body></html>"""


def _site(tmp_path, head: str = "", body: str = "") -> None:
    (tmp_path / "_static").mkdir()
    (tmp_path / "_static" / "site.css").write_text("")
    (tmp_path / "sub").mkdir()
    sub = PAGE.format(css="../_static/site.css", head="", body='<p id="here">x</p>')
    (tmp_path / "sub" / "page.html").write_text(sub)
    (tmp_path / "sub" / "index.html").write_text(sub)
    (tmp_path / "index.html").write_text(PAGE.format(css="_static/site.css", head=head, body=body))


def test_a_sound_site_passes(tmp_path):
    body = (
        '<a href="sub/page.html#here">a</a><a href="#top">b</a><a href="#old-anchor">c</a>'
        '<a href="sub/">d</a><a href="https://arxiv.org/abs/1512.04202">paper</a>'
        '<a href="mailto:x@y">m</a><img src="data:image/png;base64,AAAA">'
    )
    _site(tmp_path, body=body)
    checked, problems = docs_mod.check_site(tmp_path)
    assert problems == [] and checked == 7  # 3 pages' stylesheets and 4 relative links


def test_broken_links_anchors_and_remote_loads_are_reported(tmp_path):
    head = '<script src="https://cdn.example.org/mathjax.js"></script>'
    body = (
        '<a href="missing.html">a</a><a href="sub/page.html#nowhere">b</a>'
        '<img src="_images/none.png"><a href="../outside.html">c</a>'
    )
    _site(tmp_path, head=head, body=body)
    (tmp_path.parent / "outside.html").write_text("")
    _, problems = docs_mod.check_site(tmp_path)
    assert len(problems) == 5, problems
    text = "\n".join(problems)
    assert "loads https://cdn.example.org/mathjax.js from another host" in text
    assert "missing.html: no such file" in text
    assert "no id 'nowhere' there" in text
    assert "_images/none.png: no such file" in text
    assert "../outside.html: points outside the site" in text


def test_the_command_builds_then_checks(tmp_path, monkeypatch, capsys):
    def fake_build(out, fresh=True, quiet=True):
        assert fresh
        _site(out, body='<a href="nope.html">x</a>')
        return 0

    monkeypatch.setattr(docs_mod, "build", fake_build)
    assert cli.main(["docs", "--out", str(tmp_path)]) == 1
    out, err = capsys.readouterr()
    assert "built 3 HTML pages" in out and "1 problems" in out and "nope.html" in err
    monkeypatch.setattr(docs_mod, "build", lambda out, fresh=True, quiet=True: 2)
    assert cli.main(["docs", "--out", str(tmp_path)]) == 2
