"""`python -m demo --out runs/demo`: the end-to-end demo (see demo/run.py)."""

from demo.run import main

main()
