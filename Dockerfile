# The example service: bootmigrate migrates the database in the FastAPI lifespan, so every
# replica of this image can boot at once.
FROM python:3.12-slim

WORKDIR /app
COPY pyproject.toml README.md LICENSE ./
COPY src ./src
RUN pip install --no-cache-dir ".[fastapi]" "uvicorn>=0.30"
COPY migrations ./migrations
COPY examples ./examples

ENV PORT=8000
EXPOSE 8000
HEALTHCHECK --interval=5s --timeout=3s --start-period=10s --retries=30 \
  CMD python -c "import os, urllib.request; urllib.request.urlopen(f'http://127.0.0.1:{os.environ[\"PORT\"]}/readyz')"
CMD ["sh", "-c", "exec uvicorn --factory examples.fastapi_app:main --host 0.0.0.0 --port ${PORT}"]
