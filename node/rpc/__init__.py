"""The gRPC shell: servicers, the hub link, error mapping and peer identity."""
