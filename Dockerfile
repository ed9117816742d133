FROM python:3.11-slim
WORKDIR /app
COPY requirements.txt .
RUN pip install --no-cache-dir -r requirements.txt
COPY config ./config
COPY kisse ./kisse
COPY handlers ./handlers
COPY storage ./storage
RUN useradd --system --uid 10001 kisse
USER kisse
ENV KISSE_HOST=0.0.0.0 KISSE_PORT=8080
EXPOSE 8080
HEALTHCHECK --interval=15s --timeout=3s --start-period=5s \
  CMD python -c "import urllib.request,sys; sys.exit(urllib.request.urlopen('http://127.0.0.1:8080/healthz', timeout=2).status != 200)"
CMD ["python", "-m", "kisse"]
