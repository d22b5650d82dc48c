"""What every command's failure must look like, checked one way for all tests."""


def one_line_error(r, *needles, code=None):
    """Exit status ``code`` (None: any but 0), no traceback, exactly one line
    on stderr holding every needle; returns that line."""
    assert r.returncode != 0 if code is None else r.returncode == code, (r.returncode, r.stdout, r.stderr)
    assert "Traceback" not in r.stderr, r.stderr
    lines = [line for line in r.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, r.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]
