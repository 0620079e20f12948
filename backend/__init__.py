"""Label Studio adapter for the ls-clickseg model: HTTP app, image access and brush RLE."""
