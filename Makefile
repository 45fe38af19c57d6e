# `make demo` and `make test` do all the set-up on a fresh machine.
VENV ?= .venv
PYTHON ?= python3
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp
DEMO_PROMPT ?= a red circle moving left on a navy background

.PHONY: install system-deps demo test services clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	# The CPU wheel first: a looser pin would pull several GB of CUDA packages.
	$(BIN)/pip install --disable-pip-version-check -q torch==2.13.0
	$(BIN)/pip install --disable-pip-version-check -q -e '.[test]'
	touch $(STAMP)

system-deps:
	scripts/system-deps.sh

install: $(STAMP) system-deps

demo: install
	# The toy model shipped in workers/toy/checkpoints: a 2-second clip at 1280x720, the final
	# (wan-toy, 20 steps) and the draft (its shipped 4-step int8 student) from the same seed.
	$(BIN)/farm render "$(DEMO_PROMPT)" --model wan-toy --track final --frames 17 --fps 8 --seed 1 -o demo.mp4
	$(BIN)/farm render "$(DEMO_PROMPT)" --model wan-toy --track draft --frames 17 --fps 8 --seed 1 -o demo-draft.mp4

services:
	scripts/services.sh

test: install services
	$(BIN)/pytest

clean:
	rm -rf .farm demo.mp4 demo-draft.mp4
