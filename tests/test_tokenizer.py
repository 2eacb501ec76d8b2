from erase_engine.tokenizer import clip_tokenizer


def test_clip_tokenizer_is_the_real_one():
    tokenizer = clip_tokenizer()
    assert tokenizer.vocab_size == 49408
    # ids of OpenAI's CLIP vocabulary: <|startoftext|> a photo of a cat <|endoftext|>
    assert tokenizer("a photo of a cat").input_ids == [49406, 320, 1125, 539, 320, 2368, 49407]
    padded = clip_tokenizer("!")("cat", padding="max_length", max_length=77).input_ids
    assert padded[:3] == [49406, 2368, 49407] and padded[3:] == [0] * 74
