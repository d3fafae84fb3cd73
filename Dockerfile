# harlflow: CPU image. Build: docker build -t harlflow .   Run: docker run --rm -v $PWD/artifacts:/work/artifacts harlflow optimize harlflow.examples:small_cnn
FROM python:3.11-slim

# gcc: TVM's export_library links model.so with the system compiler. Debian's versions are not
# pinned: the slim base image moves them, and any 12.x gcc links the same.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends gcc libc6-dev \
    && rm -rf /var/lib/apt/lists/*

WORKDIR /opt/harlflow
# the CPU build of torch (the default wheel pulls several GB of CUDA libraries)
RUN pip install --no-cache-dir torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu
COPY pyproject.toml README.md ./
COPY harl ./harl
COPY xrlflow ./xrlflow
COPY tasks ./tasks
COPY flows ./flows
COPY harlflow ./harlflow
RUN pip install --no-cache-dir .

WORKDIR /work
ENV HARLFLOW_HOME=/work/artifacts \
    PREFECT_SERVER_ANALYTICS_ENABLED=false \
    MLFLOW_DISABLE_TELEMETRY=true
ENTRYPOINT ["harlflow"]
CMD ["--help"]
