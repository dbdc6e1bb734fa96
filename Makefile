.PHONY: install test demo bench
install:
	bash tools/install.sh
test:
	bash tools/loopback.sh .venv/bin/python -m pytest
demo:
	.venv/bin/rtsort demo
bench:
	bash tools/loopback.sh .venv/bin/rtsort bench
