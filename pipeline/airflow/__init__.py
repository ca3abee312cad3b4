"""What the Airflow DAG and plugin use: alert callbacks and the gating-report browser."""
