"""Files replaced whole (preannotate.files): readers never see half a file, failures leave the old one."""

import os
import stat

import pytest
from preannotate.files import replacing, write_atomically


def test_write_atomically_replaces_the_file_and_leaves_no_temporary(tmp_path):
    path = tmp_path / "state.json"
    write_atomically(path, "old")
    write_atomically(path, b"new")
    assert path.read_text() == "new"
    assert [p.name for p in tmp_path.iterdir()] == ["state.json"]
    # the usual permissions (umask), not a private temporary file's 0600: other processes read the store
    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE(path.stat().st_mode) == 0o666 & ~umask


def test_an_error_while_writing_keeps_the_old_file(tmp_path):
    path = tmp_path / "checkpoint.pt"
    path.write_text("complete")
    with pytest.raises(RuntimeError), replacing(path) as temporary:
        temporary.write_text("half")
        raise RuntimeError("killed")
    assert path.read_text() == "complete"
    assert [p.name for p in tmp_path.iterdir()] == ["checkpoint.pt"]
