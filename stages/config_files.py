"""Where the Hydra config tree (conf/) is: the checkout's, or the copy inside an installed wheel.

A source checkout or an editable install reads ``conf/`` next to ``stages/``. A non-editable
install (``pip install .``) has no checkout: setup.py ships ``conf/`` inside the wheel as the
package ``stages.conf``, so the same files sit in ``stages/conf/`` of site-packages. Imports
nothing heavy: the CLI resolves this before Hydra parses the command line.
"""

from __future__ import annotations

from pathlib import Path

_PACKAGE = Path(__file__).resolve().parent
# Installed wheel first: next to an installed `stages/` another distribution's `conf/` may sit.
_CANDIDATES = (_PACKAGE / "conf", _PACKAGE.parent / "conf")


def find_conf_dir() -> Path:
    """The conf/ directory this installation composes from (the first that has config.yaml).

    When none has, returns the checkout's path, so that Hydra's own "Primary config
    directory not found" error names where the files were expected.
    """
    for candidate in _CANDIDATES:
        if (candidate / "config.yaml").is_file():
            return candidate
    return _CANDIDATES[-1]


CONF_DIR = find_conf_dir()
