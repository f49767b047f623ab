"""``python -m bootmigrate``: the operator CLI."""

from .cli import main

main()
