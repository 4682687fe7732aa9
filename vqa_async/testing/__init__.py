"""What the tests and the bench share to start and talk to real servers (see launch.py and http.py). Shipped with
the package but never imported by the server: `from vqa_async.testing.launch import start_serve, start_cluster`."""
