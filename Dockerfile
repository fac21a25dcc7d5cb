# CPU image that fine-tunes google/flan-t5-small on the example dataset:
#   docker build -t finetune . && docker run -v "$PWD/output:/app/output" finetune
FROM python:3.11-slim

# graphviz draws the DAG picture (python run.py --dag dag.png)
RUN apt-get update \
    && apt-get install -y --no-install-recommends graphviz \
    && rm -rf /var/lib/apt/lists/*

WORKDIR /app
COPY requirements.txt .
# PyTorch's CPU index supplies the CPU build of the pinned torch (no CUDA libraries in the image)
RUN pip install --no-cache-dir --extra-index-url https://download.pytorch.org/whl/cpu \
    -r requirements.txt

COPY finetune_module/ finetune_module/
COPY run.py example-support-dataset.json ./

ENV PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
CMD ["python", "run.py", "--data", "example-support-dataset.json", \
     "--input-key", "question", "--output-key", "reply", "--output-dir", "/app/output"]
