"""Speech corpora → sharded token manifests for distillation and scoring (`mamtra prepare`).

Modules: `sources` (one lister per corpus layout: LibriTTS, Kaldi, CosyVoice parquet, Seed-TTS-eval),
`shards` (speaker split, shard plan and keys, reading finished shards back), `prepare` (tokenizing in worker
processes and writing the output directory). The manifest format itself is `mamtra_cli.data_manifest`.
"""
