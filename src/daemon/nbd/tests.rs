// Vendored placeholder: the nbd branch owns these tests; replaced on merge.
