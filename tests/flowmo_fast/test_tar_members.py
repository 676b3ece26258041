"""The header walk of flowmo_fast.formats.tar_members gives tarfile's members, truncation and errors: for the
ustar, GNU and pax formats (long and non-ASCII names, folders, links, empty files), webdataset's writer, cut-off
copies, and the files it hands to tarfile."""

from __future__ import annotations

import io
import tarfile

import pytest
import webdataset

from flowmo_fast.formats.tar_members import Members, Unusual, members_by_tarfile, tar_members, walk_headers

LONG = "a-folder-name-of-sixty-characters-to-pass-ustar-s-100-bytes/" * 2 + "image.jpg"  # 129 characters


def write(path, entries, format=tarfile.PAX_FORMAT) -> str:
    """entries: (name, bytes) files, (name, "dir"), (name, "->target") symbolic links, (name, "=>target") hard links."""
    with tarfile.open(path, "w", format=format) as tar:
        for name, what in entries:
            info = tarfile.TarInfo(name)
            if what == "dir":
                info.type = tarfile.DIRTYPE
                tar.addfile(info)
            elif isinstance(what, str):
                info.type, info.linkname = (tarfile.SYMTYPE if what[0] == "-" else tarfile.LNKTYPE), what[2:]
                tar.addfile(info)
            else:
                info.size = len(what)
                tar.addfile(info, io.BytesIO(what))
    return str(path)


ENTRIES = [
    ("top", "dir"), ("top/a.jpg", b"x" * 700), ("top/a.cls", b"3"), ("top/empty.txt", b""),
    ("top/block.png", b"y" * 1024), ("link.jpg", "->top/a.jpg"), ("hard.jpg", "=>top/a.jpg"),
    (LONG, b"z" * 10), ("données/été.jpg", b"w" * 5), ("p" * 90 + "/" + "q" * 90 + ".jpg", b"v" * 3),
]


@pytest.mark.parametrize("format", [tarfile.USTAR_FORMAT, tarfile.GNU_FORMAT, tarfile.PAX_FORMAT])
def test_the_walk_reads_each_format_as_tarfile_does(tmp_path, format):
    path = write(tmp_path / "a.tar", ENTRIES, format)
    walked = walk_headers(path)  # not handed to tarfile: the walk itself
    assert walked == members_by_tarfile(path) and not walked.truncated
    names = [name for name, _, _ in walked.regular]
    assert LONG in names and "top/block.png" in names and "top" not in names and "link.jpg" not in names
    with open(path, "rb") as f:
        data = f.read()
    assert all(data[offset : offset + size] == dict(ENTRIES)[name] for name, offset, size in walked.regular)


def test_the_walk_reads_webdatasets_writer(tmp_path):
    path = str(tmp_path / "w.tar")
    with webdataset.TarWriter(path) as writer:
        for i in range(3):
            writer.write({"__key__": f"dir/s{i}", "jpg": b"j" * (100 * i), "cls": i, "json": {"i": i}})
    assert walk_headers(path) == members_by_tarfile(path)
    assert len(walk_headers(path).regular) == 9


def test_a_pax_size_record_overrides_the_header_s_size(tmp_path):
    """As a writer does for files of 8 GiB and more: the size in a pax record, the header's field 0."""
    path = tmp_path / "big.tar"
    with tarfile.open(path, "w", format=tarfile.PAX_FORMAT) as tar:
        for name, data in (("a.jpg", b"a" * 1500), ("b.jpg", b"b" * 20)):
            info = tarfile.TarInfo(name)
            info.size, info.pax_headers = len(data), {"size": str(len(data))}
            tar.addfile(info, io.BytesIO(data))
    data = bytearray(path.read_bytes())
    header = 1024  # a.jpg's own header, after its pax header and record block
    data[header + 124 : header + 136] = b"00000000000\0"
    data[header + 148 : header + 156] = b"        "
    data[header + 148 : header + 156] = b"%06o\0 " % sum(data[header : header + 512])
    path.write_bytes(bytes(data))
    assert members_by_tarfile(str(path)).regular[0] == ("a.jpg", header + 512, 1500)  # tarfile takes the record
    assert walk_headers(str(path)) == members_by_tarfile(str(path))


@pytest.mark.parametrize("cut", ["inside data", "inside padding", "inside a header", "no end blocks"])
def test_a_cut_off_copy_is_read_as_tarfile_reads_it(tmp_path, cut):
    path = write(tmp_path / "a.tar", [("a.jpg", b"a" * 600), ("b.jpg", b"b" * 600), ("c.jpg", b"c" * 600)])
    with tarfile.open(path) as tar:
        last = tar.getmembers()[-1]
    length = {"inside data": last.offset_data + 300, "inside padding": last.offset_data + 700,
              "inside a header": last.offset + 100, "no end blocks": last.offset_data + 1024}[cut]
    with open(path, "rb") as f:
        data = f.read()[:length]
    with open(path, "wb") as f:
        f.write(data)
    walked = walk_headers(path)
    assert walked == members_by_tarfile(path)
    assert walked.truncated == (cut in ("inside data", "inside padding"))


def test_what_the_walk_leaves_to_tarfile_gets_tarfiles_answer(tmp_path):
    global_path = tmp_path / "global.tar"  # a global pax header with a path
    with tarfile.open(global_path, "w", format=tarfile.PAX_FORMAT, pax_headers={"path": "x"}) as tar:
        info = tarfile.TarInfo("a.jpg")
        info.size = 3
        tar.addfile(info, io.BytesIO(b"abc"))
    two = write(tmp_path / "two.tar", [("a.jpg", b"a" * 10), ("b.jpg", b"b" * 10)])
    with open(two, "rb") as f:
        data = bytearray(f.read())
    data[1024 + 148 : 1024 + 156] = b"0000000\0"  # b.jpg's header (after a.jpg's header and data block)
    (tmp_path / "bad.tar").write_bytes(bytes(data))
    for path in (str(global_path), str(tmp_path / "bad.tar")):
        with pytest.raises(Unusual):
            walk_headers(path)
        assert tar_members(path) == members_by_tarfile(path)
    assert [name for name, _, _ in tar_members(str(tmp_path / "bad.tar")).regular] == ["a.jpg"]  # tarfile stops there


@pytest.mark.parametrize("content", [b"", b"not a tar file at all" * 40])
def test_a_file_that_is_not_a_tar_raises_tarfiles_error(tmp_path, content):
    (tmp_path / "x.tar").write_bytes(content)
    with pytest.raises(tarfile.ReadError):
        tar_members(str(tmp_path / "x.tar"))


def test_a_file_of_zeros_is_an_empty_archive(tmp_path):
    (tmp_path / "z.tar").write_bytes(bytes(1024))
    assert tar_members(str(tmp_path / "z.tar")) == Members([], False) == members_by_tarfile(str(tmp_path / "z.tar"))
