"""Conversation data for C-RLFT: files -> classes/template -> weighted examples -> TFDS/ArrayRecord
-> grain loader -> packed [B, L] batches.

Modules (import what you need; nothing heavy is imported here):
  tokenizer   load_tokenizer(path_or_hub_name) -> (tokenizer, eot_id)   (the file's own pipeline);
              save_tokenizer(tokenizer, dir)   (a folder AutoTokenizer loads without a rebuild)
  template    ConvClass, Conversation, Message, Example, build_example, build_prompt,
              render_chat_template, PLAIN_CONDITION, FAMILIES   (training, inference and export)
  config      data_defaults(), validate(config.data) -> DataSpec
  readers     read_conversations(spec) (ShareGPT / OpenAI / OpenChat, JSON / JSONL)
  prepare     prepare(config.data, *, overwrite, verbose) -> report; load_dataset_info(dataset_dir)
  packing     plan_epoch, first_fit_decreasing
  loader      make_loader(dataset_dir, *, global_batch_size, seq_len, seed, ...) -> PackedLoader
"""
