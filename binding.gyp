{
  "targets": [
    {
      "target_name": "colo_native",
      "sources": ["native/colo_native.c"],
      "cflags": ["-O2", "-Wall"]
    }
  ]
}
