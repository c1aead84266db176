"""Writes csrc/include/fastsel/score_contract.h, the C++ side of the scoring op's
contract, from fastsel/contract.py (its one definition). setup.py runs it before every
build; run it alone with ``python csrc/write_contract_header.py`` (``--check``: exit 1 if
the header differs instead of writing it).

contract.py is loaded from its file, not as part of the package: importing fastsel would
load the compiled extension this header is built into.
"""

import argparse
import importlib.util
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def load_contract():
    spec = importlib.util.spec_from_file_location("_fastsel_contract", ROOT / "fastsel" / "contract.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def write_header(check: bool = False) -> bool:
    """Writes the header if it differs (or, with ``check``, only says whether it does);
    returns whether it was current."""
    contract = load_contract()
    path = ROOT / contract.HEADER
    text = contract.cpp_header()
    current = path.exists() and path.read_text() == text
    if not current and not check:
        path.write_text(text)
    return current


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="exit 1 if the header is out of date; write nothing")
    args = parser.parse_args(argv)
    current = write_header(check=args.check)
    if not current:
        print(f"{ROOT / load_contract().HEADER} {'is out of date' if args.check else 'written'}")
    return 1 if args.check and not current else 0


if __name__ == "__main__":
    sys.exit(main())
