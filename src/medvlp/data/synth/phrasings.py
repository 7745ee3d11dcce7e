"""Sentence templates of SynthCXR reports: a training pool and a disjoint held-out pool.

``POOLS["train"]`` words the reports of the train and validation splits, ``POOLS["heldout"]``
those of the test split: different wording, synonyms and sentence structures, and no template
in common (checked by the tests), so a model that memorised training sentences is measured on
language it has not seen. Templates are ``str.format`` strings over the fields that
:mod:`.reports` computes per finding (``side``, ``zone``, ``lobe``, ``sev``, ``sevadv``,
``adj``, ``rib``, ``tip_cm``, ``tip_site``, ``vein``, ``dir``, ``convex``, ``curve``, ``noun``).

Per key: ``pos`` (FINDINGS, present), ``hedge`` (present but subtle: uncertain wording),
``impr`` (IMPRESSION, present), ``himpr`` (hedged IMPRESSION). Per class under ``neg``:
negations. Other keys: normal statements and comparison with the prior study.
Every sentence naming a class must obey :func:`.reports.report_contract`.
"""
from __future__ import annotations

TRAIN = {
    "Cardiomegaly": {
        "pos": ["The cardiac silhouette is {sevadv} enlarged.", "{Sev} cardiomegaly.",
                "There is {sev} enlargement of the cardiac silhouette.", "Heart size is {sevadv} enlarged."],
        "impr": ["Cardiomegaly.", "{Sev} cardiomegaly.", "Enlarged cardiac silhouette."],
    },
    "Pleural Effusion": {
        "pos": ["{Sev} {side} pleural effusion.",
                "There is a {sev} {side} pleural effusion with blunting of the {side} costophrenic angle.",
                "{Sev} {side} pleural effusion layering at the {side} base."],
        "hedge": ["Blunting of the {side} costophrenic angle may represent a small {side} pleural effusion.",
                  "Possible small {side} pleural effusion."],
        "impr": ["{Sev} {side} pleural effusion.", "{Side} pleural effusion."],
        "himpr": ["Possible small {side} pleural effusion."],
    },
    "Pleural Effusion/bilateral": {
        "pos": ["{Sev} bilateral pleural effusions.",
                "There are {sev} bilateral pleural effusions with blunting of both costophrenic angles.",
                "{Sev} pleural effusions are present bilaterally."],
        "hedge": ["Blunting of both costophrenic angles may represent small bilateral pleural effusions."],
        "impr": ["{Sev} bilateral pleural effusions.", "Bilateral pleural effusions."],
        "himpr": ["Possible small bilateral pleural effusions."],
    },
    "Consolidation": {
        "pos": ["{Adj} consolidation in the {side} {zone} zone.",
                "{Adj} airspace opacity in the {side} {zone} zone, consistent with consolidation.",
                "There is {adj} consolidation of the {lobe}.", "{Adj} airspace consolidation in the {lobe}."],
        "hedge": ["Subtle opacity in the {side} {zone} zone may represent early consolidation.",
                  "Faint {side} {zone} zone opacity, possibly airspace disease."],
        "impr": ["{Side} {zone} zone consolidation.", "Consolidation in the {lobe}.",
                 "{Side} {zone} zone airspace disease, consistent with pneumonia."],
        "himpr": ["Possible early {side} {zone} zone pneumonia."],
    },
    "Atelectasis/plate": {
        "pos": ["Linear opacity in the {side} {zone} zone consistent with plate-like atelectasis.",
                "There is plate-like atelectasis in the {side} {zone} zone.", "Mild {side} {zone} zone atelectasis."],
        "hedge": ["Streaky {side} {zone} zone opacity, likely atelectasis."],
        "impr": ["Plate-like atelectasis in the {side} {zone} zone.", "Mild {side} {zone} zone atelectasis."],
        "himpr": ["Streaky {side} {zone} zone opacity, likely atelectasis."],
    },
    "Atelectasis/bibasilar": {
        "pos": ["Bibasilar linear opacities consistent with plate-like atelectasis.", "Mild bibasilar atelectasis."],
        "hedge": ["Streaky bibasilar opacities, likely atelectasis."],
        "impr": ["Bibasilar atelectasis.", "Mild bibasilar atelectasis."],
        "himpr": ["Streaky bibasilar opacities, likely atelectasis."],
    },
    "Atelectasis/segmental": {
        "pos": ["Wedge-shaped opacity in the {side} {zone} zone consistent with segmental atelectasis.",
                "There is segmental atelectasis in the {lobe}."],
        "impr": ["Segmental atelectasis in the {lobe}.", "{Side} {zone} zone segmental atelectasis."],
    },
    "Atelectasis/lobar": {
        "pos": ["Collapse of the {lobe} with associated volume loss.",
                "Dense opacity in the {side} {zone} zone with volume loss, consistent with lobar atelectasis."],
        "impr": ["{Lobe} collapse.", "Lobar atelectasis of the {lobe}."],
    },
    "Edema/mild": {
        "pos": ["Mild pulmonary vascular congestion.", "There is mild vascular congestion with Kerley B lines.",
                "Prominent pulmonary vasculature consistent with mild vascular congestion."],
        "hedge": ["Prominent pulmonary vasculature may represent mild vascular congestion."],
        "impr": ["Mild pulmonary vascular congestion.", "Mild interstitial edema."],
        "himpr": ["Possible mild vascular congestion."],
    },
    "Edema": {
        "pos": ["{Sev} pulmonary edema.", "There is {sev} interstitial and alveolar edema.",
                "Perihilar haziness and indistinct vessels consistent with {sev} pulmonary edema."],
        "impr": ["{Sev} pulmonary edema.", "Findings consistent with {sev} pulmonary edema."],
    },
    "Nodule": {
        "pos": ["A {sev} nodule is seen in the {side} {zone} zone.", "{Sev} nodular opacity in the {side} {zone} lung zone.",
                "There is a {sev} pulmonary nodule in the {side} {zone} zone."],
        "hedge": ["A possible small nodule in the {side} {zone} zone."],
        "impr": ["{Side} {zone} zone pulmonary nodule.",
                 "{Sev} {side} lung nodule; CT is recommended for further evaluation."],
        "himpr": ["Possible {side} {zone} zone nodule; CT could be considered."],
    },
    "Calcified Granuloma": {
        "pos": ["Calcified granuloma in the {side} {zone} zone.", "There is a small calcified granuloma in the {lobe}.",
                "A punctate calcified granuloma projects over the {side} {zone} lung."],
        "hedge": ["Small dense focus in the {side} {zone} zone, likely a calcified granuloma."],
        "impr": ["{Side} {zone} zone calcified granuloma.", "Calcified granuloma, sequela of prior granulomatous disease."],
        "himpr": ["Probable calcified granuloma in the {side} {zone} zone."],
    },
    "Pneumothorax": {
        "pos": ["{Sev} {side} pneumothorax.", "There is a {sev} {side} apical pneumothorax with a visible pleural line.",
                "{Sev} {side} apicolateral pneumothorax is present.",
                "A {sev} {side} pneumothorax is seen, with absent lung markings peripheral to the pleural line."],
        "hedge": ["Possible small {side} apical pneumothorax."],
        "impr": ["{Sev} {side} pneumothorax.", "{Side} pneumothorax."],
        "himpr": ["Possible small {side} apical pneumothorax."],
    },
    "Scoliosis": {
        "pos": ["{Sev} {convex} scoliosis of the thoracic spine.", "There is {sev} {curve}scoliosis of the thoracic spine.",
                "{Sev} scoliosis, convex to the {dir}."],
        "hedge": ["Mild curvature of the thoracic spine, possibly positional."],
        "impr": ["{Sev} thoracic scoliosis.", "Thoracic scoliosis, convex to the {dir}."],
        "himpr": ["Mild thoracic curvature, possibly positional."],
    },
    "Support Devices/ett": {
        "pos": ["Endotracheal tube terminates {tip_cm} cm above the carina.",
                "The endotracheal tube tip is {tip_cm} cm above the carina."],
        "impr": ["Endotracheal tube in standard position.", "Endotracheal tube {tip_cm} cm above the carina."],
    },
    "Support Devices/cvc": {
        "pos": ["{Side} {vein} central venous catheter with tip in the {tip_site}.",
                "{Side} {vein} central line terminates in the {tip_site}."],
        "impr": ["{Side} {vein} central venous catheter in the {tip_site}."],
    },
    "Support Devices/picc": {
        "pos": ["{Side} PICC line with tip in the {tip_site}.", "{Side} upper extremity PICC terminates in the {tip_site}."],
        "impr": ["{Side} PICC line in the {tip_site}."],
    },
    "Support Devices/ng": {
        "pos": ["Enteric tube courses below the diaphragm with tip in the {tip_site}.",
                "Nasogastric tube tip is in the {tip_site}."],
        "impr": ["Nasogastric tube in the {tip_site}."],
    },
    "Support Devices/ng-malposition": {
        "pos": ["Nasogastric tube tip is in the {tip_site}; recommend advancing.",
                "Enteric tube terminates in the {tip_site}, above the diaphragm."],
        "impr": ["Nasogastric tube in the {tip_site}; advancement is recommended."],
    },
    "Support Devices/pacemaker": {
        "pos": ["{Side} chest wall pacemaker with leads in the right atrium and right ventricle.",
                "{Side}-sided pacemaker device with intact leads."],
        "impr": ["{Side}-sided pacemaker in place."],
    },
    "Support Devices/icd": {
        "pos": ["{Side}-sided ICD with leads terminating in the right heart.",
                "{Side} chest wall defibrillator with intact leads."],
        "impr": ["{Side}-sided ICD in place."],
    },
    "Support Devices/sternotomy": {
        "pos": ["Median sternotomy wires are intact.", "Postoperative changes of median sternotomy."],
        "impr": ["Status post median sternotomy."],
    },
    "Fracture/acute": {
        "pos": ["Acute fracture of the {side} {rib} rib laterally.", "There is a displaced {side} lateral {rib} rib fracture."],
        "hedge": ["Possible nondisplaced fracture of the {side} lateral {rib} rib."],
        "impr": ["Acute {side} {rib} rib fracture.", "{Side} rib fracture."],
        "himpr": ["Possible {side} {rib} rib fracture."],
    },
    "Fracture/healing": {
        "pos": ["Healing fracture of the {side} {rib} rib with callus formation.", "Old healed {side} {rib} rib fracture."],
        "hedge": ["Possible healing fracture of the {side} {rib} rib."],
        "impr": ["Healing {side} rib fracture.", "Old {side} {rib} rib fracture."],
        "himpr": ["Possible healing {side} rib fracture."],
    },
    "neg": {
        "Cardiomegaly": ["Heart size is normal.", "The cardiac silhouette is within normal limits.",
                         "Normal heart size.", "No cardiomegaly.", "The cardiomediastinal silhouette is normal."],
        "Pleural Effusion": ["No pleural effusion.", "No pleural effusions.", "There is no pleural effusion."],
        "Consolidation": ["No focal consolidation.", "No focal airspace opacity.", "There is no consolidation."],
        "Atelectasis": ["No atelectasis.", "There is no focal atelectasis."],
        "Edema": ["No pulmonary edema.", "No vascular congestion.", "There is no pulmonary edema."],
        "Nodule": ["No pulmonary nodules.", "No suspicious pulmonary nodule.", "There are no nodules."],
        "Calcified Granuloma": ["No calcified granulomas.", "No granulomatous calcification."],
        "Pneumothorax": ["No pneumothorax.", "There is no pneumothorax."],
        "Scoliosis": ["No scoliosis.", "No significant scoliosis."],
        "Support Devices": ["No support devices.", "No lines or tubes."],
        "Fracture": ["No displaced rib fracture.", "No acute fracture."],
    },
    "neg_pleura": ["No pleural effusion or pneumothorax.", "No pneumothorax or pleural effusion."],
    "clear_lungs": ["The lungs are clear.", "Lungs are clear bilaterally.", "The lungs are well expanded and clear."],
    "normal_vessels": ["Pulmonary vascularity is normal."],
    "bones": ["No acute osseous abnormality.", "Osseous structures are intact."],
    "normal_impression": ["No acute cardiopulmonary process.", "No acute cardiopulmonary abnormality.",
                          "Normal chest radiograph.", "No active disease in the chest."],
    "cmp_same": ["Unchanged compared with the prior study.", "Stable since the prior examination."],
    "cmp_new": ["This is new since the prior study.", "New compared with the prior examination."],
    "cmp_up": ["Interval increase since the prior study.", "Increased compared with the prior examination."],
    "cmp_down": ["Interval decrease since the prior study.", "Improved compared with the prior examination."],
    "cmp_resolved": ["No residual {noun} since the prior study.", "No {noun}, previously seen."],
}

HELDOUT = {
    "Cardiomegaly": {
        "pos": ["The heart is {sevadv} enlarged.", "Cardiac enlargement, {sev} in degree.",
                "{Sev} enlargement of the heart is noted."],
        "impr": ["Enlarged heart.", "{Sev} cardiac enlargement."],
    },
    "Pleural Effusion": {
        "pos": ["A {sev} amount of pleural fluid is noted on the {side}, consistent with effusion.",
                "The {side} costophrenic angle is blunted by a {sev} effusion.",
                "{Sev} effusion in the {side} pleural space."],
        "hedge": ["Minimal blunting of the {side} costophrenic sulcus, questionable trace effusion."],
        "impr": ["{Side}-sided pleural effusion, {sev}.", "Effusion on the {side}."],
        "himpr": ["Questionable trace {side} effusion."],
    },
    "Pleural Effusion/bilateral": {
        "pos": ["{Sev} effusions are noted on both sides.", "Both costophrenic angles are blunted by {sev} effusions."],
        "hedge": ["Minimal blunting of both costophrenic sulci, questionable trace effusions."],
        "impr": ["Effusions on both sides, {sev}."],
        "himpr": ["Questionable trace effusions on both sides."],
    },
    "Consolidation": {
        "pos": ["The {lobe} shows {adj} consolidative change.", "{Adj} region of consolidation projects over the {side} {zone} lung.",
                "Airspace disease is noted in the {side} {zone} lung, {adj} in extent."],
        "hedge": ["Ill-defined {side} {zone} lung opacity, suspicious for developing consolidation; could represent pneumonia."],
        "impr": ["Consolidative change of the {lobe}.", "Airspace disease of the {side} {zone} lung, compatible with pneumonia."],
        "himpr": ["{Side} {zone} lung opacity could represent pneumonia."],
    },
    "Atelectasis/plate": {
        "pos": ["Discoid atelectasis is noted at the {side} {zone} lung.", "Subsegmental atelectatic band across the {side} {zone} lung."],
        "hedge": ["Band-like density at the {side} {zone} lung, probably subsegmental atelectasis."],
        "impr": ["Discoid atelectasis at the {side} {zone} lung.", "Subsegmental atelectasis, {side} {zone} lung."],
        "himpr": ["Probable subsegmental atelectasis, {side} {zone} lung."],
    },
    "Atelectasis/bibasilar": {
        "pos": ["Atelectatic bands are seen at both lung bases.", "Discoid atelectasis at both bases."],
        "hedge": ["Band-like densities at both bases, probably subsegmental atelectasis."],
        "impr": ["Atelectasis at both lung bases."],
        "himpr": ["Probable subsegmental atelectasis at both bases."],
    },
    "Atelectasis/segmental": {
        "pos": ["Triangular density of the {lobe}, compatible with segmental atelectasis.",
                "The {lobe} shows segmental atelectatic change."],
        "impr": ["Atelectatic change of the {lobe}, segmental."],
    },
    "Atelectasis/lobar": {
        "pos": ["The {lobe} is collapsed, with loss of volume on the {side}.",
                "Volume loss on the {side} with opacification of the {lobe}, compatible with lobar collapse."],
        "impr": ["Collapsed {lobe}.", "Lobar collapse on the {side}, {lobe}."],
    },
    "Edema/mild": {
        "pos": ["Pulmonary venous congestion is present, mild in degree.", "Cephalization of the vessels and septal lines indicate mild congestion."],
        "hedge": ["Vessels appear slightly indistinct, questionable early congestion."],
        "impr": ["Venous congestion, mild.", "Early interstitial edema pattern."],
        "himpr": ["Questionable early venous congestion."],
    },
    "Edema": {
        "pos": ["Bilateral perihilar opacities compatible with {sev} edema.", "Edema of the lungs, {sev} in degree, is present.",
                "Hazy bilateral opacities, {sev}, reflecting pulmonary edema."],
        "impr": ["Pulmonary edema, {sev}.", "Edema pattern in both lungs, {sev}."],
    },
    "Nodule": {
        "pos": ["A {sev} rounded nodular density projects over the {side} {zone} lung.", "The {lobe} contains a {sev} nodule.",
                "Nodular density, {sev}, at the {side} {zone} lung."],
        "hedge": ["Questionable faint nodular density at the {side} {zone} lung."],
        "impr": ["Nodule of the {lobe}; recommend chest CT.", "Nodular density at the {side} {zone} lung."],
        "himpr": ["Questionable nodular density at the {side} {zone} lung; consider CT."],
    },
    "Calcified Granuloma": {
        "pos": ["Calcified granulomas project over the {side} {zone} lung.", "The {lobe} shows a dense calcification, a granuloma.",
                "Granulomatous calcification at the {side} {zone} lung."],
        "hedge": ["Tiny dense focus at the {side} {zone} lung, probably a calcified granuloma."],
        "impr": ["Old granulomatous disease at the {side} {zone} lung.", "Calcified granuloma of the {lobe}."],
        "himpr": ["Probable calcified granuloma of the {lobe}."],
    },
    "Pneumothorax": {
        "pos": ["On the {side}, a {sev} pneumothorax is identified.", "A pleural line with no lung markings beyond it indicates a {sev} pneumothorax on the {side}.",
                "The {side} lung apex is separated from the chest wall by a {sev} pneumothorax."],
        "hedge": ["Questionable thin pleural line at the {side} apex; a tiny pneumothorax cannot be excluded."],
        "impr": ["Pneumothorax on the {side}, {sev}.", "{Sev} pneumothorax, {side} side."],
        "himpr": ["A tiny {side} pneumothorax cannot be excluded."],
    },
    "Scoliosis": {
        "pos": ["The thoracic spine is curved, convex {dir}ward, compatible with {sev} scoliosis.", "{Sev} {curve}scoliotic curvature of the spine."],
        "hedge": ["Slight spinal curvature, which may be positional."],
        "impr": ["Scoliosis of the thoracic spine, {sev}.", "Scoliotic curvature, convex {dir}ward."],
        "himpr": ["Slight spinal curvature, may be positional."],
    },
    "Support Devices/ett": {
        "pos": ["The ET tube tip lies {tip_cm} cm from the carina.", "An endotracheal tube is seen, its tip {tip_cm} cm proximal to the carina."],
        "impr": ["ET tube, tip {tip_cm} cm above carina."],
    },
    "Support Devices/cvc": {
        "pos": ["A central venous catheter via the {side} {vein} vein ends in the {tip_site}.", "The {side} {vein} catheter tip projects over the {tip_site}."],
        "impr": ["{Side} {vein} catheter, tip at the {tip_site}."],
    },
    "Support Devices/picc": {
        "pos": ["A peripherally inserted central catheter from the {side} arm ends in the {tip_site}.", "The {side}-arm PICC tip projects over the {tip_site}."],
        "impr": ["{Side}-arm PICC, tip at the {tip_site}."],
    },
    "Support Devices/ng": {
        "pos": ["A feeding tube passes into the {tip_site}.", "The orogastric tube tip projects over the {tip_site}."],
        "impr": ["Feeding tube, tip at the {tip_site}."],
    },
    "Support Devices/ng-malposition": {
        "pos": ["The orogastric tube tip lies in the {tip_site} and should be advanced.", "A feeding tube ends in the {tip_site}."],
        "impr": ["Feeding tube ends in the {tip_site}; advance the tube."],
    },
    "Support Devices/pacemaker": {
        "pos": ["A cardiac pacing device overlies the {side} chest, leads in expected position.", "Pacemaker generator over the {side} chest wall."],
        "impr": ["Cardiac pacemaker, {side} side."],
    },
    "Support Devices/icd": {
        "pos": ["An implantable cardioverter-defibrillator overlies the {side} chest.", "Defibrillator generator on the {side} with a shocking coil in the right ventricle."],
        "impr": ["Defibrillator, {side} side."],
    },
    "Support Devices/sternotomy": {
        "pos": ["Sternal wires from prior sternotomy.", "Sternotomy wires are seen along the midline."],
        "impr": ["Prior sternotomy."],
    },
    "Fracture/acute": {
        "pos": ["The {rib} rib on the {side} shows an acute fracture.", "A fracture with step-off is seen in the lateral {side} {rib} rib."],
        "hedge": ["Cortical irregularity of the {side} {rib} rib, questionable fracture."],
        "impr": ["Fracture of the {side} {rib} rib, acute.", "Acute rib fracture on the {side}."],
        "himpr": ["Questionable fracture of the {side} {rib} rib."],
    },
    "Fracture/healing": {
        "pos": ["The {side} {rib} rib shows callus from a healing fracture.", "Remote fracture of the {side} {rib} rib with callus."],
        "hedge": ["Contour deformity of the {side} {rib} rib, probably an old fracture."],
        "impr": ["Remote fracture of the {side} {rib} rib.", "Healing rib fracture on the {side}."],
        "himpr": ["Probable old fracture of the {side} {rib} rib."],
    },
    "neg": {
        "Cardiomegaly": ["The heart is normal in size.", "Cardiac size within normal range.", "Heart not enlarged."],
        "Pleural Effusion": ["Pleural effusion is not seen.", "Negative for pleural effusion.", "Without effusion."],
        "Consolidation": ["Consolidation is not seen.", "Negative for airspace disease.", "Without consolidation."],
        "Atelectasis": ["Atelectasis is not seen.", "Negative for atelectasis."],
        "Edema": ["Negative for edema.", "Edema is not seen."],
        "Nodule": ["Negative for nodules.", "Nodules are not seen."],
        "Calcified Granuloma": ["Negative for calcified granuloma.", "Granulomas are not seen."],
        "Pneumothorax": ["Negative for pneumothorax.", "Pneumothorax is not seen.", "Without pneumothorax."],
        "Scoliosis": ["Negative for scoliosis.", "Scoliosis is not seen."],
        "Support Devices": ["Negative for tubes or catheters.", "Without support devices."],
        "Fracture": ["Negative for fracture.", "Fracture is not seen."],
    },
    "neg_pleura": ["Negative for effusion or pneumothorax.", "Without effusion or pneumothorax."],
    "clear_lungs": ["Both lungs are clear.", "Clear lungs.", "The lungs appear clear."],
    "normal_vessels": ["Pulmonary vasculature is normal."],
    "bones": ["Bones show no acute osseous change.", "Visible osseous structures are intact."],
    "normal_impression": ["Negative for acute findings in the chest.", "Normal radiographic appearance of the chest.",
                          "No radiographic evidence of acute disease."],
    "cmp_same": ["No change from the previous film.", "Similar to the earlier radiograph."],
    "cmp_new": ["Not present on the earlier radiograph.", "Newly seen compared to the previous film."],
    "cmp_up": ["Larger than on the previous film.", "Worse compared to the earlier radiograph."],
    "cmp_down": ["Smaller than on the previous film.", "Better compared to the earlier radiograph."],
    "cmp_resolved": ["Interval resolution of the previously seen {noun}.", "The {noun} seen before has resolved."],
}

POOLS = {"train": TRAIN, "heldout": HELDOUT}
