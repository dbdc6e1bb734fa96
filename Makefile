.PHONY: install test demo bench
install:
	bash tools/install.sh
test:
	bash tools/run_tests.sh
demo:
	.venv/bin/rtsort demo
bench:
	.venv/bin/python tools/bench_detect.py
