# CPU image that fine-tunes google/flan-t5-small on the example dataset:
#   docker build -t finetune . && docker run -v "$PWD/output:/app/output" finetune
FROM python:3.11-slim

# graphviz draws the DAG picture (finetune dag dag.png)
RUN apt-get update \
    && apt-get install -y --no-install-recommends graphviz \
    && rm -rf /var/lib/apt/lists/*

WORKDIR /app
# Installed the way a user installs it: the pinned lock first, then the package itself.
COPY requirements.txt .
# PyTorch's CPU index supplies the CPU build of the pinned torch (no CUDA libraries in the image)
RUN pip install --no-cache-dir --extra-index-url https://download.pytorch.org/whl/cpu \
    -r requirements.txt

# the package from what its build reads; the sources go once it is installed
COPY pyproject.toml README.md /tmp/finetune-module/
COPY finetune_module/ /tmp/finetune-module/finetune_module/
RUN pip install --no-cache-dir --no-deps /tmp/finetune-module && rm -rf /tmp/finetune-module

COPY run.py example-support-dataset.json ./

ENV PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
CMD ["finetune", "--data", "example-support-dataset.json", \
     "--input-key", "question", "--output-key", "reply", "--output-dir", "/app/output"]
